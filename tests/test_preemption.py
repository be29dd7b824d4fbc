"""Preemption as clusters deliver it, one writer per folder, bad checkpoints, failing saves.

The trainer runs under torchrun (2 ranks, gloo) with 2 DataLoader workers per rank, and SIGTERM
goes to the trainer only, to the launcher only, or to the whole process group. Every test waits on
an event (metric lines, finished files) with a bound, never on a fixed time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import (
    ONE_THREAD,
    REPO_ROOT,
    child_env,
    python_command,
    run_cli,
    run_python,
    save_tiny_vae,
    write_image_tree,
)
from PIL import Image
from sample_helpers import make_export

from mdt.locking import exclusive_folder

pytestmark = pytest.mark.slow  # launches processes: `make test-fast` leaves this module out

ENV = {**ONE_THREAD, "PYTHONUNBUFFERED": "1"}  # on top of helpers.child_env
WAIT_S = 300  # the bound on every wait for an event: generous, since CI machines are slow

# Runs `mdt` and records the exit status each rank's main() ends with (torchrun does not say it
# when it shuts its ranks down on a signal).
RECORD_EXIT = """
import os, sys
from mdt.cli import main
sys.argv = ["mdt", *sys.argv[1:]]
try:
    main()
except SystemExit as done:
    code = done.code if isinstance(done.code, int) else int(done.code is not None)
    with open(os.path.join(os.environ["MDT_EXIT_DIR"], "rank" + os.environ.get("RANK", "0")), "w") as f:
        f.write(str(code))
    raise
"""

# Runs `mdt` with checkpoint writing sabotaged at one step: MDT_SAVE_FAULT=STEP:enospc raises "no
# space left on device" there, MDT_SAVE_FAULT=STEP:kill dies by SIGKILL in the middle of the save.
SAVE_FAULT = """
import errno, os, signal, sys
import mdt.train.checkpointer as checkpointer
step, kind = os.environ["MDT_SAVE_FAULT"].split(":")
real = checkpointer.write_export
def write_export(directory, *args, **kwargs):
    if f"step_{int(step):08d}" in str(directory):
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return real(directory, *args, **kwargs)
checkpointer.write_export = write_export
from mdt.cli import main
sys.argv = ["mdt", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def latents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x 8 images, in pixel space at 8 px (3x8x8), 8 per shard."""
    from mdt.data.encode import EncodeConfig, encode_dataset

    root = tmp_path_factory.mktemp("preempt-data")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(40 * c + rng.integers(0, 80, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"class{c}" / f"{i}.png")
    encode_dataset(EncodeConfig(input=str(root / "images"), out=str(root / "latents"), resolution=8,
                                vae="pixel", shard_size=8, workers=0, progress=False))
    return root / "latents"


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "DiT-T/2", "--out", str(out), "--steps", str(steps),
            "--micro-batch", "4", "--lr", "1e-3", "--log-every", "1", "--ckpt-every", "100000",
            "--set", "ema_decay=0.9", "--set", "model_options.input_size=8", *extra]


def launch(script: Path, args: list[str], *, nproc: int, exits: Path) -> subprocess.Popen:
    """Start `mdt ARGS` through `script` (one process, or torchrun's ranks) in a new process group."""
    exits.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(python_command(str(script), *args, nproc=nproc), cwd=REPO_ROOT,
                            env=child_env({**ENV, "MDT_EXIT_DIR": str(exits)}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def record_exit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    script = tmp_path_factory.mktemp("scripts") / "record_exit.py"
    script.write_text(RECORD_EXIT)
    return script


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the command ended (status {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} within {WAIT_S} s")
        time.sleep(0.05)


def latest(run: Path) -> dict:
    return json.loads((run / "checkpoints" / "LATEST.json").read_text())


def straight_losses(latents: Path, root: Path, steps: int) -> dict[int, float]:
    run = root / f"straight-{steps}"
    if not run.exists():
        result = run_cli(*train_args(latents, run, steps, "--num-workers", "2"), nproc=2, env=ENV,
                         timeout=WAIT_S)
        assert result.returncode == 0, result.stderr[-3000:]
    return losses(run)


@pytest.mark.parametrize("delivery", ["trainer", "launcher", "group"])
def test_sigterm_under_torchrun_checkpoints_the_reached_step_and_resumes_exactly(
        latents: Path, record_exit: Path, tmp_path_factory: pytest.TempPathFactory, delivery: str) -> None:
    root = tmp_path_factory.getbasetemp() / "preempt-runs"
    root.mkdir(exist_ok=True)
    run, exits = root / delivery, root / f"{delivery}-exits"
    proc = launch(record_exit, train_args(latents, run, 100000, "--num-workers", "2"), nproc=2, exits=exits)
    wait_for(lambda: len(losses(run)) >= 3, proc, "three training steps")
    if delivery == "group":  # SLURM's --signal, `timeout`: every process, loader workers included
        os.killpg(proc.pid, signal.SIGTERM)
    elif delivery == "launcher":  # Kubernetes, `kill PID`: torchrun forwards it to its ranks
        proc.send_signal(signal.SIGTERM)
    else:  # one rank only, twice: the second arrives while the ranks agree to stop or save
        rank0 = next(p for p in psutil.Process(proc.pid).children() if p.environ().get("RANK") == "0")
        rank0.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        rank0.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "143", "rank1": "143"}, stderr[-3000:]
    reached = max(losses(run))
    assert latest(run)["step"] == reached
    assert reached < 100000
    assert "stopped by SIGTERM at step" in stdout

    # Resumed with another worker count: the stream does not depend on it. The group case (a SLURM
    # requeue) resumes on one process: the same stream, the optimizer state resharded (elastic).
    target, nproc = reached + 3, 1 if delivery == "group" else 2
    result = run_cli("train", "--resume", str(run), "--steps", str(target), "--num-workers", "0",
                     nproc=nproc, env=ENV, timeout=WAIT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    straight = straight_losses(latents, root, max(target, 40))
    expected = {s: straight[s] for s in range(1, target + 1)}
    if nproc == 2:
        assert losses(run) == expected
    else:
        assert "written on 2 processes (ZeRO-2) on 1" in result.stdout
        assert losses(run) == pytest.approx(expected, rel=1e-5)  # gradients summed in another order


def test_checkpoint_failures_leave_a_resumable_run(latents: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    every = ("--ckpt-every", "2", "--num-workers", "0")
    # Killed in the middle of the save at step 4: step 2 stays in charge.
    crashed = run_python("-c", SAVE_FAULT, *train_args(latents, run, 6, *every),
                         env={**ENV, "MDT_SAVE_FAULT": "4:kill"}, timeout=WAIT_S)
    assert crashed.returncode == -signal.SIGKILL
    assert latest(run)["step"] == 2
    resumed = run_cli("train", "--resume", str(run), "--steps", "6", timeout=WAIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004 has no files.json" in resumed.stdout
    assert "resuming from step_00000002" in resumed.stdout
    assert latest(run)["step"] == 6
    assert sorted(losses(run)) == list(range(1, 7))

    # The disk fills up at step 8: one sentence, exit 3, step 6 stays in charge, nothing partial kept.
    full = run_python("-c", SAVE_FAULT, "train", "--resume", str(run), "--steps", "10",
                      env={**ENV, "MDT_SAVE_FAULT": "8:enospc"}, timeout=WAIT_S)
    assert full.returncode == 3, full.stderr[-3000:]
    assert "writing checkpoint step_00000008" in full.stderr
    assert "No space left on device" in full.stderr
    assert "the checkpoint step_00000006 stays in charge" in full.stderr
    assert latest(run)["step"] == 6
    assert not (run / "checkpoints" / "step_00000008").exists()

    # A file of the newest checkpoint is cut short later: resume falls back to the one before.
    shard = max((run / "checkpoints" / "step_00000006").rglob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:100])
    fallback = run_cli("train", "--resume", str(run), "--steps", "7", timeout=WAIT_S)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert f"{shard} holds 100 of its" in fallback.stdout
    assert "resuming from step_00000004" in fallback.stdout
    assert latest(run)["step"] == 7

    # The stream settings cannot change on resume; every checkpoint cut: refused, naming the file.
    changed = run_cli("train", "--resume", str(run), "--steps", "9", "--set", "seed=1", timeout=WAIT_S)
    assert changed.returncode == 2
    assert "seed is 1 but the run was trained with 0" in changed.stderr
    for folder in (run / "checkpoints").glob("step_*"):
        (folder / "ema" / "model.safetensors").unlink()
    refused = run_cli("train", "--resume", str(run), "--steps", "9", timeout=WAIT_S)
    assert refused.returncode == 2
    assert "no checkpoint is whole" in refused.stderr
    assert "model.safetensors is missing" in refused.stderr
    assert "Traceback" not in refused.stderr


HOLD_LOCK = """
import sys, time
from mdt.locking import exclusive_folder
with exclusive_folder(sys.argv[1], "--out"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_one_writer_per_folder(latents: Path, tmp_path: Path) -> None:
    run, samples, encoded = tmp_path / "run", tmp_path / "samples", tmp_path / "latents"
    vae = save_tiny_vae(tmp_path / "vae")
    make_export(tmp_path / "export", vae_spec=str(vae))
    with exclusive_folder(run, "--out"), exclusive_folder(samples, "--out"), exclusive_folder(encoded, "OUT"):
        mine = f"pid {os.getpid()}"
        train = run_cli(*train_args(latents, run, 2, "--num-workers", "0"), timeout=WAIT_S)
        assert train.returncode == 2, train.stderr
        assert f"--out {run} is in use by {mine}" in train.stderr, train.stderr
        sample = run_cli("sample", "--ckpt", str(tmp_path / "export"), "--out", str(samples), "--num-samples", "2",
                         "--steps", "2", timeout=WAIT_S)
        assert sample.returncode == 2, sample.stderr
        assert f"--out {samples} is in use by {mine}" in sample.stderr, sample.stderr
        encode = run_cli("encode", str(write_image_tree(tmp_path / "images")), str(encoded), "--vae", "pixel",
                         "--resolution", "16", timeout=WAIT_S)
        assert encode.returncode == 2, encode.stderr
        assert f"OUT {encoded} is in use by {mine}" in encode.stderr, encode.stderr
    assert not (run / "checkpoints").exists()
    assert not list(samples.glob("*.png"))

    # A holder killed by SIGKILL leaves no lock behind.
    holder = subprocess.Popen(python_command("-c", HOLD_LOCK, str(run)), cwd=REPO_ROOT, env=child_env(ENV),
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    holder.kill()
    holder.wait()
    train = run_cli(*train_args(latents, run, 2, "--num-workers", "0"), timeout=WAIT_S)
    assert train.returncode == 0, train.stderr[-3000:]


def test_group_sigterm_to_encode_and_sample_leaves_folders_a_rerun_completes(
        imagenet_sample: Path, record_exit: Path, tmp_path: Path) -> None:
    encode = ["encode", str(imagenet_sample / "train"), "--vae", "pixel", "--resolution", "32",
              "--shard-size", "20", "--workers", "2", "--batch-size", "8"]
    out, reference = tmp_path / "latents", tmp_path / "latents-straight"
    proc = launch(record_exit, [*encode, str(out)], nproc=1, exits=tmp_path / "encode-exit")
    wait_for(lambda: len(list(out.glob("shard-*.tar"))) >= 2, proc, "two finished shards")
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 143, stderr[-3000:]
    assert (tmp_path / "encode-exit" / "rank0").read_text() == "143", stderr[-3000:]
    assert not list(out.glob(".*.tmp"))
    assert not (out / "manifest.json").exists()
    assert run_cli(*encode, str(out), timeout=WAIT_S, env=ONE_THREAD).returncode == 0
    assert run_cli(*encode, str(reference), timeout=WAIT_S, env=ONE_THREAD).returncode == 0
    for shard in reference.glob("shard-*.tar"):
        assert (out / shard.name).read_bytes() == shard.read_bytes()

    vae = save_tiny_vae(tmp_path / "vae")
    make_export(tmp_path / "export", vae_spec=str(vae))
    # Enough work that the signal lands mid-run on a fast machine too (2 of 48 samples written first).
    sample = ["sample", "--ckpt", str(tmp_path / "export"), "--num-samples", "48", "--batch-size", "2",
              "--steps", "40"]
    samples, straight = tmp_path / "samples", tmp_path / "samples-straight"
    proc = launch(record_exit, [*sample, "--out", str(samples)], nproc=1, exits=tmp_path / "sample-exit")
    wait_for(lambda: len(list(samples.glob("[0-9]*.png"))) >= 2, proc, "two finished samples")
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 143, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr, stderr[-3000:]
    kept = sorted(p.name for p in samples.glob("[0-9]*.png"))
    assert 2 <= len(kept) < 48
    assert not list(samples.glob(".*.tmp"))
    assert not (samples / "samples.npz").exists()
    assert run_cli(*sample, "--out", str(samples), timeout=WAIT_S, env=ONE_THREAD).returncode == 0
    assert run_cli(*sample, "--out", str(straight), timeout=WAIT_S, env=ONE_THREAD).returncode == 0
    pngs = sorted(p.name for p in straight.glob("[0-9]*.png"))
    assert len(pngs) == 48
    assert all((samples / n).read_bytes() == (straight / n).read_bytes() for n in pngs)
