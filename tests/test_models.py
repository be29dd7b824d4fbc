import json
from pathlib import Path

import pytest
import torch
from model_helpers import FAMILIES_TINY, inputs, tiny
from torch.utils.flop_counter import FlopCounterMode

from mdt.errors import UserError
from mdt.models import (
    block_mask,
    create_model,
    crop_mask,
    kept_indices,
    list_models,
    load_pretrained,
    model_config,
    random_mask,
    save_pretrained,
)
from mdt.models.relative_position import RelativePositionBias

MASKED_FAMILIES = [n for n in FAMILIES_TINY if not n.startswith("DiT")]


@pytest.mark.parametrize("name", FAMILIES_TINY)
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape_covers_full_grid(name, learn_sigma):
    model = tiny(name, input_size=16, learn_sigma=learn_sigma)
    x, t, y = inputs(size=16)
    out = model(x, t, y)
    assert out.shape == (3, 8 if learn_sigma else 4, 16, 16)
    if model.config.supports_mask:
        assert model(x, t, y, random_mask(3, 8, 0.5)).shape == out.shape


@pytest.mark.parametrize("name", MASKED_FAMILIES)
def test_mask_that_drops_nothing_equals_full_forward(name):
    model = tiny(name)
    x, t, y = inputs()
    full = model(x, t, y)
    masked = model(x, t, y, torch.zeros(3, 16, dtype=torch.bool))
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MASKED_FAMILIES)
def test_masked_output_depends_on_the_mask(name):
    model = tiny(name)
    x, t, y = inputs()
    a = model(x, t, y, random_mask(3, 4, 0.5, generator=torch.Generator().manual_seed(0)))
    b = model(x, t, y, random_mask(3, 4, 0.5, generator=torch.Generator().manual_seed(1)))
    assert not torch.allclose(a, b)


def _params_with_grad(model, mask):
    model.zero_grad(set_to_none=True)
    x, t, y = inputs()
    model(x, t, y, mask).square().mean().backward()
    return {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


@pytest.mark.parametrize("name", FAMILIES_TINY)
def test_gradients_reach_every_parameter_a_pass_uses(name):
    model = tiny(name)
    names = {n for n, _ in model.named_parameters()}
    full = _params_with_grad(model, None)
    cfg = model.config
    if cfg.restore == "side_interpolater":
        unused_in_full = {n for n in names if n.startswith("restore.block.") or n == "restore.mask_token"}
    elif cfg.restore == "mask_token":
        unused_in_full = {"restore.mask_token"}
    else:
        unused_in_full = set()
    assert full == names - unused_in_full
    if cfg.supports_mask:
        assert _params_with_grad(model, random_mask(3, 4, 0.5)) == names


def _blocks_input_lengths(model, mask):
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
             for b in model.encoder.blocks]
    x, t, y = inputs()
    model(x, t, y, mask)
    for h in hooks:
        h.remove()
    return lengths


@pytest.mark.parametrize("name", MASKED_FAMILIES)
def test_encoder_runs_on_kept_tokens_only(name):
    model = tiny(name)
    assert _blocks_input_lengths(model, random_mask(3, 4, 0.5)) == [8] * len(model.encoder.blocks)
    assert _blocks_input_lengths(model, None) == [16] * len(model.encoder.blocks)


@pytest.mark.parametrize("name", ["MDTv2-S/2", "MaskDiT-S/2"])
def test_compute_falls_with_mask_ratio(name):
    model = create_model(name)
    x, t, y = torch.randn(1, 4, 32, 32), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    flops = {}
    for ratio in (0.0, 0.5):
        mask = random_mask(1, 16, ratio) if ratio else None
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x, t, y, mask)
        flops[ratio] = counter.get_total_flops()
    cfg = model.config
    # A block's cost per token grows with its width squared; MaskDiT's decoder is 512 wide at every size.
    decoder_width = cfg.decoder_hidden_size or cfg.hidden_size
    encoder = cfg.encoder_depth * cfg.hidden_size**2
    encoder_share = encoder / (encoder + (cfg.decoder_depth + 1) * decoder_width**2)
    # The encoder's share halves (or better, attention is quadratic) at ratio 0.5.
    assert flops[0.5] < flops[0.0] * (1 - 0.5 * encoder_share + 0.05)


def test_dit_refuses_a_mask():
    model = tiny("DiT-T/2")
    x, t, y = inputs()
    with pytest.raises(ValueError, match="takes no mask"):
        model(x, t, y, random_mask(3, 4, 0.5))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, t, y: (torch.randn(3, 4, 16, 16), t, y), r"expects latents of shape \(B, 4, 8, 8\)"),
        (lambda x, t, y: (torch.randn(3, 3, 8, 8), t, y), r"expects latents of shape \(B, 4, 8, 8\)"),
        (lambda x, t, y: (x, t, torch.tensor([0, 1, 11])), r"labels must lie in \[0, 10\]"),
        (lambda x, t, y: (x, t, torch.tensor([0, -1, 2])), r"labels must lie in \[0, 10\]"),
        (lambda x, t, y: (x, t[:2], y), "timesteps and labels must have shape"),
    ],
)
def test_bad_inputs_raise_value_error_naming_expectation(change, message):
    model = tiny("MDTv2-T/2")
    with pytest.raises(ValueError, match=message):
        model(*change(*inputs()))


def test_bad_mask_shapes_raise():
    model = tiny("MaskDiT-T/2")
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3, 16\)"):
        model(x, t, y, torch.zeros(3, 15, dtype=torch.bool))
    uneven = torch.zeros(3, 16, dtype=torch.bool)
    uneven[0, :3] = True
    with pytest.raises(ValueError, match="same number of tokens"):
        model(x, t, y, uneven)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
@pytest.mark.parametrize("masker", [random_mask, block_mask, crop_mask])
def test_mask_ratio_outside_unit_interval_raises(masker, ratio):
    with pytest.raises(ValueError, match=r"mask ratio must be in \[0, 1\)"):
        masker(2, 8, ratio)


def test_random_mask_drops_exact_count_per_sample_and_is_seeded():
    a = random_mask(16, 8, 0.3, generator=torch.Generator().manual_seed(5))
    b = random_mask(16, 8, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert (a.sum(1) == 64 - int(64 * 0.7)).all()  # int(N (1 - r)) kept, as MAE/MDT/MaskDiT: 44, not 45
    assert len({tuple(row.tolist()) for row in a}) > 1  # samples differ


def test_block_mask_drops_whole_blocks():
    mask = block_mask(4, 8, 0.5, block=2, generator=torch.Generator().manual_seed(0)).view(4, 8, 8)
    blocks = mask.view(4, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(4, 16, 4)
    assert ((blocks.all(-1)) | (~blocks.any(-1))).all()  # every 2x2 group all dropped or all kept
    assert (mask.flatten(1).sum(1) == 32).all()


def test_crop_mask_keeps_one_contiguous_window():
    mask = crop_mask(6, 8, 0.75, generator=torch.Generator().manual_seed(0)).view(6, 8, 8)
    for sample in ~mask:
        rows = sample.any(1).nonzero().flatten()
        cols = sample.any(0).nonzero().flatten()
        window = sample[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert window.all()
        assert window.numel() == sample.sum() == 16


def test_kept_indices_are_sorted_positions_of_kept_tokens():
    mask = torch.tensor([[True, False, False, True], [False, True, False, True]])
    assert kept_indices(mask).tolist() == [[1, 2], [0, 2]]


def test_registry_names_and_unknown_name_lists_known_ones():
    names = list_models()
    for family in ("DiT", "MDT", "MDTv2", "MaskDiT"):
        for size in ("T", "S", "B", "L", "XL"):
            assert f"{family}-{size}/2" in names
    assert "DiT-XL/8" in names
    with pytest.raises(ValueError, match="known models: .*MDTv2-XL/2"):
        model_config("MDTv3-XL/2")
    with pytest.raises(ValueError, match="unknown model option"):
        model_config("DiT-S/2", depht=3)


@pytest.mark.parametrize("name, published", [("DiT-XL/2", 675e6), ("DiT-S/2", 33e6)])
def test_parameter_counts_match_papers(name, published):
    with torch.device("meta"):
        model = create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - published) / published < 0.01


@pytest.mark.parametrize("name", ["DiT-XL/2", "MDT-XL/2", "MDTv2-XL/2"])
def test_parameter_counts_equal_the_official_code(name):
    """Against the official models built on the meta device (tests/fixtures/make_official_fixtures.py). The
    official relative-position tables have 3 unused rows per attention layer; DiT's fixed position
    embedding is a parameter there and a buffer here."""
    official = json.loads((Path(__file__).parent / "fixtures/official/param_counts.json").read_text())
    with torch.device("meta"):
        model = create_model(name)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    saved = sum(tensors[k].numel() for k in model.state_dict())
    tables = [m for m in model.modules() if isinstance(m, RelativePositionBias)]
    assert saved + sum(3 * t.table.shape[1] for t in tables) == official[name]


def test_mdt_presets_follow_the_papers():
    v2 = model_config("MDTv2-XL/2")
    assert (v2.encoder_depth, v2.decoder_depth, v2.long_skips, v2.input_skip) == (24, 4, True, True)
    assert model_config("MDTv2-S/2").decoder_depth == 6
    v1 = model_config("MDT-XL/2")
    assert (v1.encoder_depth, v1.decoder_depth, v1.long_skips) == (26, 2, False)
    md = model_config("MaskDiT-XL/2")
    assert (md.depth, md.decoder_depth, md.decoder_hidden_size) == (28, 8, 512)


@pytest.mark.parametrize("name", FAMILIES_TINY)
def test_save_and_load_round_trip(tmp_path, name):
    model = tiny(name)
    save_pretrained(model, tmp_path / "export")
    loaded = load_pretrained(tmp_path / "export")
    x, t, y = inputs()
    torch.testing.assert_close(loaded(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)
    assert loaded.config == model.config


def test_load_refuses_missing_or_mismatched_weights(tmp_path):
    with pytest.raises(UserError, match="model_config.json does not exist"):
        load_pretrained(tmp_path)
    save_pretrained(tiny("DiT-T/2"), tmp_path / "a")
    save_pretrained(tiny("MDT-T/2"), tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(UserError, match="does not match"):
        load_pretrained(tmp_path / "b")
