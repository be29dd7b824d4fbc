"""tools/check_readme_commands.py: the README's command lines are accepted by the programs they name,
and the checker fails on a line they reject."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers import ONE_THREAD, run_python

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out


def check_readme(*args: str) -> subprocess.CompletedProcess:
    return run_python("tools/check_readme_commands.py", *args, env=ONE_THREAD, timeout=900)


def test_the_readme_commands_are_accepted_and_the_benchmarks_run() -> None:
    result = check_readme()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    # the multi-node launch line and the benchmarks' GPU lines are among the lines checked
    assert any(line.startswith("ok") and "RDZV=" in line for line in lines)
    assert any(line.startswith("ok") and "bench-train BENCH_ARGS=" in line and "--sizes" in line for line in lines)
    ran = [line for line in lines if line.startswith("ran ")]
    assert len(ran) == 3, ran
    assert all(line.endswith("exit 0") for line in ran), ran


def test_a_rejected_flag_fails_the_check(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "```bash\n"
        "P=pipelines/demo.yaml\n"
        "mdt sample --ckpt run --out x --num-sample 5      # a misspelt flag\n"
        'make bench-train BENCH_ARGS="--dtypo bf16"\n'
        "python tools/benchmarks/bench_model.py --batch eight\n"
        "torchrun --nproc_per_node 2 --nodez 2 -m mdt.cli train --config $P\n"
        "make train PIPELINE=$P TRAIN_ARGS='--set lr=1e-4'\n"
        "```\n\n"
        "Inline, `mdt fid --skip-weights` is a fragment, `mdt train --out/--resum RUN` names two flags;\n"
        "`mdt models` and `mdt train --out/--resume RUN` are fine.\n")
    result = check_readme("--readme", str(readme), "--no-run")
    assert result.returncode == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert [line.split()[1] for line in bad] == ["mdt", "make", "python", "torchrun", "mdt", "mdt"], result.stdout
    for words in ("--num-sample", "--dtypo", "'eight'", "--nodez", "--skip-weights", "--resum\n"):
        assert words in result.stdout, words
    assert "6 problem(s)" in result.stdout
