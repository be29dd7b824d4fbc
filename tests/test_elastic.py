"""Elastic resume: one run's global stream on 1 or 2 processes, and a checkpoint resumed on another
number of processes (ZeRO-2 with AdamW, ZeRO-3 with Adan), against uninterrupted runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import assert_ok, run_cli, train_args, train_losses

from mdt.errors import UserError
from mdt.train.checks import fit_global_batch
from mdt.train.config import TrainConfig
from mdt.train.run_dir import LATEST, RunDir

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
STEPS, HALF = 8, 4
# AdamW under ZeRO-2 (its step is a tensor per partition), Adan under ZeRO-3 (four moments, step per group).
SETUPS = {2: ("--set", "optimizer.name=adamw"), 3: ("--set", "optimizer.name=adan")}


def launch(data: Path, run: Path, stage: int, nproc: int) -> None:
    """A run of STEPS steps with a global batch of 8 (micro 4): grad_accum 2 on one process, 1 on two."""
    accum = str(2 // nproc)
    args = train_args(data, run, "MaskDiT-T/2", STEPS, "--grad-accum", accum, "--ckpt-every", str(HALF),
                      "--set", "keep_last=3", "--deepspeed-config", f"deepspeed_configs/zero{stage}.json",
                      *SETUPS[stage])
    assert_ok(run_cli(*args, nproc=nproc, env=ENV, timeout=300))


def preempted_copy(run: Path, into: Path) -> Path:
    """The run as a preemption after its step-HALF checkpoint would have left it."""
    shutil.copytree(run, into)
    shutil.rmtree(into / "checkpoints" / f"step_{STEPS:08d}")
    record = json.loads((into / "checkpoints" / f"step_{HALF:08d}" / "elastic" / "state.json").read_text())
    layout = {k: record[k] for k in ("world_size", "zero_stage", "global_batch")}
    (into / "checkpoints" / LATEST).write_text(json.dumps({"tag": f"step_{HALF:08d}", "step": HALF, **layout}))
    lines = (into / "metrics.jsonl").read_text().splitlines()
    (into / "metrics.jsonl").write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= HALF))
    (into / "metrics.json").unlink()
    return into


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert a.keys() == b.keys()
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a, b)


@pytest.fixture(scope="module")
def runs(pixel_latents: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    """Uninterrupted runs on 1 and 2 processes for each ZeRO stage, checkpointed half way."""
    root = tmp_path_factory.mktemp("elastic")
    out = {}
    for stage in SETUPS:
        for nproc in (1, 2):
            out[stage, nproc] = root / f"zero{stage}-{nproc}"
            launch(pixel_latents, out[stage, nproc], stage, nproc)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(SETUPS))
def test_one_and_two_processes_train_the_same_run(runs, stage):
    """The stream, the per-sample noise and the logged loss (the global batch's) are world-size free."""
    assert_close(train_losses(runs[stage, 1]), train_losses(runs[stage, 2]))


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(SETUPS))
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_another_number_of_processes(runs, tmp_path, stage, before, after):
    run = preempted_copy(runs[stage, before], tmp_path / "run")
    result = run_cli("train", "--resume", str(run), nproc=after, env=ENV, timeout=300)
    assert_ok(result)
    assert f"written on {before} processes (ZeRO-{stage}) on {after}" in result.stdout
    assert f"global batch 8 = micro 4 x accum {2 // after} x {after} ranks" in result.stdout
    assert_close(train_losses(run), train_losses(runs[stage, after]))
    assert yaml.safe_load((run / "config.yaml").read_text())["grad_accum"] == 2 // after


@pytest.mark.slow
def test_a_resume_with_a_smaller_micro_batch_trains_the_same_samples_with_the_same_draws(runs, tmp_path):
    """Every per-sample draw is keyed by the sample's place in the global batch: micro-batches of 2 on
    one process (accumulation 4) continue the 2-process run of micro-batches of 4."""
    run = preempted_copy(runs[2, 2], tmp_path / "run")
    result = run_cli("train", "--resume", str(run), "--micro-batch", "2", nproc=1, env=ENV, timeout=300)
    assert_ok(result)
    assert "global batch 8 = micro 2 x accum 4 x 1 ranks" in result.stdout
    assert_close(train_losses(run), train_losses(runs[2, 1]))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_a_resume_may_change_the_zero_stage(runs, tmp_path, stage):
    """A ZeRO-2 checkpoint of 2 processes resumed on one process under ZeRO-1 or ZeRO-3."""
    run = preempted_copy(runs[2, 2], tmp_path / "run")
    result = run_cli("train", "--resume", str(run), "--deepspeed-config", f"deepspeed_configs/zero{stage}.json",
                     nproc=1, env=ENV, timeout=300)
    assert_ok(result)
    assert f"written on 2 processes (ZeRO-2) on 1 (ZeRO-{stage})" in result.stdout
    assert_close(train_losses(run), train_losses(runs[2, 1]))


def write_run(root: Path, micro: int, accum: int, world: int) -> RunDir:
    run = RunDir(root)
    (root / "checkpoints").mkdir(parents=True)
    TrainConfig(data="d", out=str(root), micro_batch=micro, grad_accum=accum).save(run.config)
    return run


def test_the_global_batch_is_kept_and_grad_accum_derived(tmp_path):
    run = write_run(tmp_path, micro=4, accum=1, world=4)
    record = {"world_size": 4, "global_batch": 16}
    cfg = TrainConfig(data="d", out=str(tmp_path), micro_batch=4, grad_accum=1)
    assert fit_global_batch(cfg, run, record, world=1).grad_accum == 4
    assert fit_global_batch(cfg, run, record, world=2).grad_accum == 2
    smaller = TrainConfig(data="d", out=str(tmp_path), micro_batch=2, grad_accum=1)  # --micro-batch 2
    assert fit_global_batch(smaller, run, record, world=2).grad_accum == 4


def test_a_global_batch_the_new_world_cannot_make_is_refused_naming_what_works(tmp_path):
    run = write_run(tmp_path, micro=4, accum=1, world=4)
    cfg = TrainConfig(data="d", out=str(tmp_path), micro_batch=4, grad_accum=1)
    with pytest.raises(UserError, match=r"global batch of 16 samples, which 3 processes cannot make from "
                       r"micro-batches of 4 .*launch 1 or 2 or 4 processes with micro-batch 4 \(leave"):
        fit_global_batch(cfg, run, {"world_size": 4, "global_batch": 16}, world=3)
    with pytest.raises(UserError, match=r"keep 2 and pass --micro-batch 1 or 2 or 4 or 8 \(leave"):
        fit_global_batch(TrainConfig(data="d", out=str(tmp_path), micro_batch=3, grad_accum=1), run,
                         {"world_size": 4, "global_batch": 16}, world=2)


def test_global_batch_fixes_grad_accum_for_any_number_of_processes():
    cfg = TrainConfig(data="d", out="o", micro_batch=4, global_batch=16)
    assert [fit_global_batch(cfg, None, {}, world).grad_accum for world in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(UserError, match=r"^global_batch: the run trains with a global batch of 16 samples, which 8 "
                                        r"processes cannot make .* keep 8 and pass --micro-batch 1 or 2 \(leave"):
        fit_global_batch(cfg, None, {}, world=8)
    unset = TrainConfig(data="d", out="o", micro_batch=4, grad_accum=3)
    assert fit_global_batch(unset, None, {}, world=2) is unset
