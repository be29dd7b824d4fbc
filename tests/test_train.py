"""The trainer end to end through the CLI: one process and torchrun (2 processes, gloo) on CPU."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_ok, metrics, run_cli, train_args, train_losses
from safetensors.torch import load_file

from mdt.errors import UserError
from mdt.models import load_pretrained
from mdt.train.config import resolve_config
from mdt.train.ema import EMA
from mdt.train.engine import resolve_deepspeed_config
from mdt.train.schedules import lr_multiplier, unmask_ratio

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TWO_RANKS = dict(nproc=2, env=ENV, timeout=300)  # torchrun --standalone --nproc_per_node 2 (gloo)


@pytest.mark.slow
@pytest.mark.parametrize("stage, model", [(1, "DiT-T/2"), (2, "MDTv2-T/2"), (3, "MaskDiT-T/2")])
def test_zero_stages_train_each_objective_on_two_ranks(pixel_latents, tmp_path, stage, model):
    run = tmp_path / "run"
    result = run_cli(*train_args(pixel_latents, run, model, 40, "--deepspeed-config",
                                 f"deepspeed_configs/zero{stage}.json", "--val-every", "20", "--val-shards", "1",
                                 "--ckpt-every", "20"), **TWO_RANKS)
    assert_ok(result)
    assert f"ZeRO-{stage}" in result.stdout
    assert "global batch 8 = micro 4 x accum 1 x 2 ranks" in result.stdout
    losses = list(train_losses(run).values())
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < 0.85 * np.mean(losses[:5]), losses  # EDM's loss varies with the sigmas drawn
    vals = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in vals] == [20, 40]
    model_out = load_pretrained(run / "ema")
    x = torch.randn(2, 3, 8, 8)
    channels = 6 if model_out.config.learn_sigma else 3  # MaskDiT (EDM) has no learned variance
    assert model_out(x, torch.tensor([1, 500]), torch.tensor([0, 4])).shape == (2, channels, 8, 8)
    formulation = json.loads((run / "ema" / "diffusion.json").read_text())["formulation"]
    assert formulation == ("edm" if model.startswith("MaskDiT") else "ddpm")
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000020", "step_00000040"]
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["final_step"] == 40
    assert "best_val_loss" in summary


@pytest.mark.slow
@pytest.mark.parametrize("model", ["MDT-T/2", "MaskDiT-T/2"])  # DDPM two passes, EDM masked
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(pixel_latents, tmp_path, model):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--deepspeed-config", "deepspeed_configs/zero2.json", "--ckpt-every", "100")
    assert_ok(run_cli(*train_args(pixel_latents, straight, model, 12, *common), **TWO_RANKS))
    assert_ok(run_cli(*train_args(pixel_latents, split, model, 6, *common), **TWO_RANKS))
    assert_ok(run_cli("train", "--resume", str(split), "--steps", "12", **TWO_RANKS))
    assert train_losses(split) == train_losses(straight)
    a, b = load_file(str(straight / "ema" / "model.safetensors")), load_file(str(split / "ema" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_ema_matches_a_hand_computed_average(pixel_latents, tmp_path, stage):
    run = tmp_path / "run"
    assert_ok(run_cli(*train_args(pixel_latents, run, "DiT-T/2", 4, "--deepspeed-config",
                                  f"deepspeed_configs/zero{stage}.json", "--ckpt-every", "1", "--set", "keep_last=10"),
                      **TWO_RANKS))
    steps = [run / "checkpoints" / f"step_{s:08d}" for s in range(1, 5)]
    reference = load_file(str(steps[0] / "ema" / "model.safetensors"))
    for folder in steps[1:]:
        weights = load_file(str(folder / "weights" / "model.safetensors"))
        reference = {k: 0.9 * reference[k] + 0.1 * weights[k] for k in reference}
    final = load_file(str(steps[-1] / "ema" / "model.safetensors"))
    for key in reference:
        torch.testing.assert_close(final[key], reference[key], rtol=1e-6, atol=1e-7)
    first_weights = load_file(str(steps[0] / "weights" / "model.safetensors"))
    assert any(not torch.equal(first_weights[k], final[k]) for k in final)


@pytest.mark.slow
def test_unmask_tuning_from_a_masked_run(pixel_latents, tmp_path):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert_ok(run_cli(*train_args(pixel_latents, base, "MaskDiT-T/2", 3), env=ENV, timeout=200))
    result = run_cli(*train_args(pixel_latents, tuned, "MaskDiT-T/2", 8, "--init-from", str(base),
                                 "--mask-schedule", "cosine"), env=ENV, timeout=200)
    assert_ok(result)
    ratios = [r["mask_ratio"] for r in metrics(tuned) if "mask_ratio" in r]
    expected = [unmask_ratio("cosine", 0.5, s / 8) for s in range(8)]
    assert ratios == pytest.approx(expected)
    assert ratios[0] > 0.4
    assert ratios[-1] < 0.01
    assert all(a >= b for a, b in zip(ratios, ratios[1:], strict=False))


@pytest.mark.slow
def test_keep_last_prunes_older_checkpoints(pixel_latents, tmp_path):
    run = tmp_path / "run"
    assert_ok(run_cli(*train_args(pixel_latents, run, "DiT-T/2", 5, "--ckpt-every", "1", "--set", "keep_last=3"),
                      env=ENV, timeout=200))
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [f"step_{s:08d}" for s in (3, 4, 5)]
    assert json.loads((run / "checkpoints" / "LATEST.json").read_text())["step"] == 5


@pytest.mark.slow
def test_tensorboard_writes_event_files_or_names_the_missing_package(pixel_latents, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*train_args(pixel_latents, run, "DiT-T/2", 2, "--tensorboard"), env=ENV, timeout=200)
    if importlib.util.find_spec("tensorboard") is None:
        assert result.returncode == 2, result.stderr[-2000:]
        assert "pip install tensorboard" in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        return
    assert_ok(result)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "loss" in accumulator.Tags()["scalars"], accumulator.Tags()
    logged = {e.step: e.value for e in accumulator.Scalars("loss")}
    assert logged == pytest.approx(train_losses(run))  # the metrics.jsonl losses, step for step


@pytest.mark.slow
def test_init_from_a_run_at_another_resolution_names_the_resolutions(pixel_latents, tmp_path):
    """An 8 px export onto 16 px latents of the same (pixel) autoencoder."""
    from mdt.data.encode import EncodeConfig, encode_dataset
    from mdt.models import create_model, save_pretrained

    export = tmp_path / "export"
    save_pretrained(create_model("DiT-T/2", input_size=8, in_channels=3, num_classes=4), export)
    (export / "data_manifest.json").write_text((pixel_latents / "manifest.json").read_text())
    data16 = tmp_path / "latents16"
    encode_dataset(EncodeConfig(input=str(pixel_latents.parent / "images"), out=str(data16), resolution=16,
                                vae="pixel", shard_size=8, workers=0, progress=False))
    result = run_cli(*train_args(data16, tmp_path / "run", "DiT-T/2", 2, "--init-from", str(export), input_size=16),
                     env=ENV, timeout=200)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trained at resolution 8 (3x8x8 latents)" in result.stderr
    assert "holds resolution 16" in result.stderr
    assert "another autoencoder" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (("--set", "model_options.input_size=16"), "expects 3x16x16 latents but .* holds 3x8x8"),
        (("--set", "model_options.num_classes=10"), "has 10 classes but .* has 4"),
        (("--val-every", "5"), "val_every needs held-out data"),
        (("--model", "MDTv3-T/2"), "unknown model 'MDTv3-T/2'"),
        (("--set", "objective.mask_ratio=0.4"), "objective settings .* do not fit the dit objective"),
        (("--max-wall-seconds", "-5"), "max_wall_seconds must be 0 \\(no budget\\) or a positive number of seconds"),
    ],
)
def test_user_mistakes_stop_before_training_with_one_sentence(pixel_latents, tmp_path, extra, message):
    run = tmp_path / "run"
    result = run_cli(*train_args(pixel_latents, run, "DiT-T/2", 2), *extra, env=ENV, timeout=200)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(message, result.stderr), result.stderr[-2000:]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_a_preset_is_not_resized_to_the_data_without_being_asked(pixel_latents, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*train_args(pixel_latents, run, "DiT-T/2", 2, input_size=None), env=ENV, timeout=200)
    assert result.returncode == 2, result.stderr[-2000:]
    assert re.search(r"DiT-T/2 is a preset for 32x32 latents but .* holds 3x8x8 .*"
                     r"set model_options.input_size=8", result.stderr), result.stderr[-2000:]
    assert not (run / "checkpoints").exists()


@pytest.mark.slow
def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(pixel_latents, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*train_args(pixel_latents, run, "DiT-T/2", 30, "--ckpt-every", "1", "--set", "lr=1e30",
                                 "--set", "grad_clip=0"), env=ENV, timeout=200)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "non-finite at step" in result.stderr
    step = int(result.stderr.split("non-finite at step ")[1].split()[0])
    latest = json.loads((run / "checkpoints" / "LATEST.json").read_text())
    assert latest["step"] == step - 1


def budget_args(data: Path, run: Path, seconds: float) -> list[str]:
    """A run that `steps` cannot end within the budget; it logs, validates and checkpoints only at its end."""
    return train_args(data, run, "DiT-T/2", 1_000_000, "--max-wall-seconds", str(seconds), "--log-every", "100000",
                      "--ckpt-every", "100000", "--val-shards", "1", "--val-every", "100000")


@pytest.mark.slow
def test_a_wall_clock_budget_stops_every_rank_at_one_step_with_a_checkpoint(pixel_latents, tmp_path):
    run = tmp_path / "run"
    result = run_cli(*budget_args(pixel_latents, run, 2), "--deepspeed-config", "deepspeed_configs/zero2.json",
                     **TWO_RANKS)
    assert_ok(result)
    summary = json.loads((run / "metrics.json").read_text())
    step = summary["stop_step"]
    assert summary["stopped_by"] == "max_wall_seconds"
    assert summary["max_wall_seconds"] == 2.0
    assert 0 < step < 1_000_000
    assert f"stopped on the budget at step {step}" in result.stdout
    # Both ranks wrote their optimizer partition of the same step: they agreed where to stop.
    assert len(list((run / "checkpoints" / f"step_{step:08d}").rglob("*optim_states.pt"))) == 2
    assert json.loads((run / "checkpoints" / "LATEST.json").read_text())["step"] == step
    train_records = [r for r in metrics(run) if "loss" in r]
    val_records = [r for r in metrics(run) if "val_loss" in r]
    assert [r["step"] for r in train_records] == [step] == [r["step"] for r in val_records]
    assert summary["final_step"] == step
    # One clock: the value that stopped the run is the one logged and summarised, whatever the load.
    clock = train_records[-1]["wall_time_s"]
    assert clock >= summary["max_wall_seconds"]
    assert val_records[-1]["wall_time_s"] == clock
    assert summary["wall_time_s"] == clock


@pytest.mark.slow
def test_a_resumed_run_keeps_its_budget_clock(pixel_latents, tmp_path):
    """The budget is the run's total: a resume goes on from the seconds the checkpoint recorded."""
    run = tmp_path / "run"
    assert_ok(run_cli(*budget_args(pixel_latents, run, 1), env=ENV, timeout=200))
    first = json.loads((run / "metrics.json").read_text())
    again = run_cli("train", "--resume", str(run), env=ENV, timeout=200)  # the recorded budget is spent
    assert_ok(again)
    assert "already reached max_wall_seconds=1" in again.stdout
    assert json.loads((run / "checkpoints" / "LATEST.json").read_text())["step"] == first["stop_step"]
    assert_ok(run_cli("train", "--resume", str(run), "--max-wall-seconds", "2", "--log-every", "1", env=ENV,
                      timeout=200))
    second = json.loads((run / "metrics.json").read_text())
    assert second["stopped_by"] == "max_wall_seconds"
    assert second["stop_step"] > first["stop_step"]
    resumed = [r["wall_time_s"] for r in metrics(run) if r["step"] > first["stop_step"]]
    assert min(resumed) >= 1.0
    assert resumed[-1] >= 2.0  # the first step after the resume: 1 s on, not 0.01 s


def test_ema_update_is_the_textbook_average():
    ema = EMA([torch.tensor([1.0, 2.0])], decay=0.75)
    ema.update([torch.tensor([5.0, 6.0])])
    ema.update([torch.tensor([9.0, 2.0])])
    first = 0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([5.0, 6.0])
    torch.testing.assert_close(ema.shadow[0], 0.75 * first + 0.25 * torch.tensor([9.0, 2.0]))


def test_schedules():
    warm = lr_multiplier("cosine", 10, 110, 0.1)
    assert warm(0) == pytest.approx(0.1)
    assert warm(9) == pytest.approx(1.0)
    assert warm(10) == pytest.approx(1.0)
    assert warm(110) == pytest.approx(0.1)
    assert warm(60) == pytest.approx(0.55)
    assert lr_multiplier("constant", 0, 100, 0.0)(50) == 1.0
    assert unmask_ratio("zero", 0.5, 0.3) == 0.0
    assert unmask_ratio("none", 0.5, 0.3) == 0.5
    assert unmask_ratio("cosine", 0.5, 0.0) == 0.5
    assert unmask_ratio("cosine", 0.5, 1.0) == pytest.approx(0.0)


def test_deepspeed_config_auto_values_and_conflicts(tmp_path):
    cfg = resolve_deepspeed_config("deepspeed_configs/zero3.json", micro_batch=8, grad_accum=2, world_size=4,
                                   grad_clip=1.0, precision="fp32")
    assert (cfg["train_batch_size"], cfg["bf16"]["enabled"], cfg["zero_optimization"]["stage"]) == (64, False, 3)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(UserError, match="sets train_micro_batch_size_per_gpu=16 but the run asks for 8"):
        resolve_deepspeed_config(path, micro_batch=8, grad_accum=1, world_size=1, grad_clip=1.0, precision="fp32")
    path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(UserError, match="has a 'optimizer' section"):
        resolve_deepspeed_config(path, micro_batch=8, grad_accum=1, world_size=1, grad_clip=1.0, precision="fp32")


def test_recipe_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  data: /d\n  out: /o\n  lr: 1.0e-4\n  objective:\n    mask_ratio: 0.4\n")
    cfg = resolve_config(recipe, {"lr": "3e-4", "objective.mae_weight": "0.2"})
    assert (cfg.lr, cfg.objective) == (3e-4, {"mask_ratio": 0.4, "mae_weight": 0.2})
    recipe.write_text("train:\n  data: /d\n  out: /o\n  learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown setting 'learning_rate' in recipe"):
        resolve_config(recipe, {})


@pytest.mark.slow
def test_bf16_training_computes_in_bf16_with_an_fp32_ema(pixel_latents, tmp_path):
    """The same seeded run in fp32 and bf16: computing in bf16 changes every loss after the first (whose
    zero-initialised output layer predicts 0 in any precision) a little; were the flag ignored, the
    CPU's default fp32 would repeat the fp32 losses bit for bit. The EMA stays fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        run = tmp_path / precision
        assert_ok(run_cli(*train_args(pixel_latents, run, "MDTv2-T/2", 3, "--precision", precision), env=ENV,
                          timeout=200))
        losses[precision] = np.array(list(train_losses(run).values()))
    ema = load_file(str(tmp_path / "bf16" / "ema" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in ema.values())
    assert np.all(losses["fp32"][1:] != losses["bf16"][1:]), losses
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.05)


@pytest.mark.slow
def test_an_old_run_resumes_with_its_recorded_settings_and_refuses_a_changed_recipe(pixel_latents, tmp_path):
    """A run folder written before the optimizer section and the clip default of 0: its recorded
    adam_betas, weight_decay and grad_clip 1.0 stay in force on resume, and a recipe whose lr differs
    from the run's is refused in one sentence instead of changing the run."""
    run = tmp_path / "run"
    assert_ok(run_cli(*train_args(pixel_latents, run, "DiT-T/2", 2, "--set", "grad_clip=1.0"), env=ENV, timeout=200))
    config = yaml.safe_load((run / "config.yaml").read_text())
    optimizer = config.pop("optimizer")
    config.update(adam_betas=optimizer["betas"], weight_decay=0.01)
    for key in ("ema_warmup", "init_ema"):
        config.pop(key)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert_ok(run_cli("train", "--resume", str(run), "--steps", "3", env=ENV, timeout=200))
    resumed = yaml.safe_load((run / "config.yaml").read_text())
    assert resumed["grad_clip"] == 1.0
    assert resumed["optimizer"] == {"name": "adamw", "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: 5.0e-4\n")
    refused = run_cli("train", "--config", str(recipe), "--resume", str(run), "--steps", "4", env=ENV, timeout=200)
    assert refused.returncode == 2
    assert "lr is 0.0005 but the run was trained with 0.001" in refused.stderr
