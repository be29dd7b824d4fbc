"""The multi-node launch line on one machine: two torchrun "nodes" (`--nnodes 2 --node_rank 0/1`, one
process each, joined at 127.0.0.1:PORT as pipelines/slurm.sbatch joins them) encode and train."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, child_env, metrics, python_command, run_cli, train_args, train_losses
from PIL import Image

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # on top of helpers.child_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(*args: str, timeout: float = 400) -> list[subprocess.CompletedProcess]:
    """`torchrun --nnodes 2 --node_rank R --nproc_per_node 1 --master_addr ... -m mdt.cli ARGS` for R = 0, 1."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        launcher = ["--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
        command = python_command("-m", "mdt.cli", *args, torchrun=launcher)
        procs.append(subprocess.Popen(command, cwd=REPO_ROOT, env=child_env(ENV), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    return results


def write_images(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def test_two_nodes_encode_and_train_as_one_world(tmp_path: Path) -> None:
    images = write_images(tmp_path / "images")
    latents = tmp_path / "latents"
    encode = ("encode", str(images), str(latents), "--vae", "pixel", "--resolution", "8", "--shard-size", "8",
              "--workers", "0", "--no-progress")
    two_nodes(*encode)
    manifest = json.loads((latents / "manifest.json").read_text())
    assert sum(s["count"] for s in manifest["shards"]) == 32
    writers = sorted(json.loads(p.read_text())["rank"] for p in (latents / ".encode-state").glob("shard-*.json"))
    assert writers == [0, 0, 1, 1]  # node 1's process wrote its half

    nodes, standalone = tmp_path / "nodes", tmp_path / "standalone"
    args = train_args(latents, nodes, "DiT-T/2", 4, "--deepspeed-config", "deepspeed_configs/zero2.json")
    node0, _ = two_nodes(*args)
    assert "global batch 8 = micro 4 x accum 1 x 2 ranks" in node0.stdout
    result = run_cli(*train_args(latents, standalone, "DiT-T/2", 4, "--deepspeed-config",
                                 "deepspeed_configs/zero2.json"), nproc=2, env=ENV, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert train_losses(nodes) == train_losses(standalone)
    assert len(train_losses(nodes)) == 4
    assert metrics(nodes)[-1]["step"] == 4
