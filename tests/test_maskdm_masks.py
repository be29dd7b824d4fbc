"""MaskDM's masks and settings: each strategy draws masks with the official generators' statistics
(tests/fixtures/official/maskdm_masks.json, made by tests/fixtures/make_maskdm_fixtures.py from
jiachenlei/maskdm's datasets/masking_generator.py), and settings that cannot hold are refused in
one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mdt.diffusion import diffusion_from_dict, make_objective
from mdt.diffusion.mdsm import MDSMObjective
from mdt.diffusion.schedule import NoiseSchedule
from mdt.models import create_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "official" / "maskdm_masks.json").read_text())
SETTINGS = FIXTURE["settings"]


def objective(grid: int, **options) -> MDSMObjective:
    schedule = NoiseSchedule(diffusion_from_dict({"learn_sigma": False}, family="uvit"))
    return MDSMObjective(schedule, num_classes=0, grid_size=grid, patch_size=4, **options)


def draw(setting: dict, count: int) -> torch.Tensor:
    options = {"masker": setting["strategy"], "mask_ratio": setting["ratio"]}
    if setting["strategy"] == "block":
        options["mask_block"] = setting["size"]
    if setting["strategy"] == "crop":
        options["crop_size"] = setting["size"]
    mask = objective(setting["grid"], **options).draw_mask(count, torch.Generator().manual_seed(1), "cpu")
    assert mask is not None
    return mask


def label(setting: dict) -> str:
    return f"{setting['strategy']}-g{setting['grid']}-r{setting['ratio']}-s{setting['size']}"


@pytest.mark.parametrize("setting", SETTINGS, ids=label)
def test_masks_drop_the_official_number_of_patches(setting: dict) -> None:
    mask = draw(setting, 64)
    assert sorted(set(mask.sum(1).tolist())) == setting["dropped_counts"]
    assert len({tuple(row.tolist()) for row in mask}) > 1  # drawn per sample


@pytest.mark.parametrize("setting", [s for s in SETTINGS if "drop_frequency" in s], ids=label)
def test_each_position_is_dropped_as_often_as_by_the_official_generator(setting: dict) -> None:
    """Per-position drop frequencies over as many draws as the fixture's: uniform for patches and
    blocks, higher in the middle for crops (a window covers the centre more often)."""
    draws = FIXTURE["draws"]
    ours = draw(setting, draws).double().mean(0)
    official = torch.tensor(setting["drop_frequency"], dtype=torch.float64)
    p = official.clamp(1e-3, 1 - 1e-3)
    bound = 5 * (2 * p * (1 - p) / draws).sqrt() + 1e-4  # 5 sigma of the difference of two estimates
    assert ((ours - official).abs() <= bound).all(), (ours - official).abs().max()


def test_block_masks_drop_whole_aligned_blocks() -> None:
    mask = draw({"strategy": "block", "grid": 64, "ratio": 0.9, "size": 4}, 8).view(8, 16, 4, 16, 4)
    blocks = mask.permute(0, 1, 3, 2, 4).reshape(8, 256, 16)
    assert (blocks.all(-1) | ~blocks.any(-1)).all()
    assert (blocks.all(-1).sum(1) == int(0.9 * 4096) // 16).all()


def test_crop_masks_keep_one_contiguous_window() -> None:
    mask = draw({"strategy": "crop", "grid": 16, "ratio": 0.9, "size": 5}, 32).view(32, 16, 16)
    for sample in ~mask:
        rows, cols = sample.any(1).nonzero().flatten(), sample.any(0).nonzero().flatten()
        window = sample[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert window.shape == (5, 5)
        assert window.all()
        assert sample.sum() == 25


def test_fine_tuning_drops_nothing_and_crops_ignore_the_ratio() -> None:
    assert objective(64, mask_ratio=0.0).draw_mask(4, torch.Generator().manual_seed(0), "cpu") is None
    assert objective(64, mask_ratio=0.0, masker="patch").draw_mask(4, None, "cpu") is None
    crop = objective(16, mask_ratio=0.0, masker="crop", crop_size=4).draw_mask(4, None, "cpu")
    assert (crop.sum(1) == 256 - 16).all()


@pytest.mark.parametrize("options, words", [
    ({"mask_ratio": 1.0}, "mask ratio must be in [0, 1)"),
    ({"mask_ratio": -0.1}, "mask ratio must be in [0, 1)"),
    ({"mask_block": 3}, "block size 3 must divide the token grid size 16"),
    ({"masker": "crop", "crop_size": 17}, "crop size 17 must lie in [1, 16]"),
    ({"masker": "crop"}, "crop masks need crop_size"),
    ({"masker": "random"}, "mask strategy must be one of"),
    ({"loss": "huber"}, "loss must be one of"),
])
def test_settings_that_cannot_hold_are_refused_in_one_sentence(options: dict, words: str) -> None:
    with pytest.raises(ValueError) as error:
        make_objective("uvit", num_classes=0, grid_size=16, patch_size=4, **options)
    assert words in str(error.value)
    assert "\n" not in str(error.value)


def test_the_objective_trains_the_visible_pixels_only() -> None:
    """The loss of a pre-training step does not depend on the model's output at dropped patches,
    and its gradient reaches the model; fine-tuning (ratio 0) sees every pixel."""
    torch.manual_seed(0)
    model = create_model("UViT-T/2", input_size=8)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    pretrain = make_objective("uvit", num_classes=0, grid_size=4, patch_size=2, mask_ratio=0.5, mask_block=2)
    assert pretrain.schedule.config.beta_schedule == "cosine"  # MaskDM's schedule by default
    mask = pretrain.draw_mask(4, torch.Generator().manual_seed(3), "cpu")
    t, noise = torch.randint(0, 1000, (4,)), torch.randn(4, 3, 8, 8)

    def poisoned(x, t, y, mask):  # the real output at visible patches, garbage at dropped ones
        out = model(x, t, y, mask)
        return torch.where(pretrain.visible_pixels(mask).bool(), out, torch.full_like(out, 1e3))

    poisoned.parameters = model.parameters
    terms = pretrain.terms(model, x0, None, t, noise, mask)["mse"]
    torch.testing.assert_close(pretrain.terms(poisoned, x0, None, t, noise, mask)["mse"], terms)
    out = pretrain(model, x0, None, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert model.final_layer.weight.grad.abs().sum() > 0
    assert set(out.parts) == {"mse"}
    finetune = make_objective("uvit", num_classes=0, grid_size=4, patch_size=2, mask_ratio=0.0)
    full = finetune.terms(model, x0, None, t, noise, None)["mse"]
    expected = ((model(pretrain.schedule.q_sample(x0, t, noise), t) - noise) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(full, expected)
