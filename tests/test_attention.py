import pytest
import torch

from mdt.models.attention import ENV_VAR, attention, resolve_backend
from mdt.models.relative_position import RelativePositionBias


def reference_attention(q, k, v, bias):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("bias_shape", [None, (4, 16, 16), (2, 4, 16, 16)])
def test_sdpa_with_bias_matches_written_out_softmax(bias_shape):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    bias = torch.randn(bias_shape, generator=gen) if bias_shape else None
    torch.testing.assert_close(attention(q, k, v, bias, "sdpa"), reference_attention(q, k, v, bias),
                               rtol=1e-5, atol=1e-5)


def test_bias_gradient_matches_reference():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    bias = torch.randn(4, 16, 16, generator=gen, requires_grad=True)
    attention(q, k, v, bias, "sdpa").sum().backward()
    ours = bias.grad.clone()
    bias.grad = None
    reference_attention(q, k, v, bias).sum().backward()
    torch.testing.assert_close(ours, bias.grad, rtol=1e-5, atol=1e-5)


def test_relative_bias_for_kept_subset_equals_full_bias_indexed():
    rpb = RelativePositionBias(grid_size=4, num_heads=3)
    full = rpb()  # (H, N, N)
    keep = torch.tensor([[0, 3, 5, 6, 15], [1, 2, 8, 9, 10]])
    subset = rpb(keep)
    assert subset.shape == (2, 3, 5, 5)
    for b in range(2):
        torch.testing.assert_close(subset[b], full[:, keep[b]][:, :, keep[b]], rtol=0, atol=0)


def test_relative_bias_depends_only_on_the_2d_offset():
    g = 4
    rpb = RelativePositionBias(grid_size=g, num_heads=2)
    full = rpb()
    for i in range(g * g):
        for j in range(g * g):
            di, dj = i // g - j // g, i % g - j % g
            row = (di + g - 1) * (2 * g - 1) + (dj + g - 1)
            torch.testing.assert_close(full[:, i, j], rpb.table[row])
    assert torch.unique(rpb.index).numel() == (2 * g - 1) ** 2


def test_backend_resolution(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend(None, torch.device("cpu")) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "sdpa")
    assert resolve_backend(None, torch.device("cpu")) == "sdpa"
    monkeypatch.setenv(ENV_VAR, "flash9")
    with pytest.raises(ValueError, match="attention backend must be one of"):
        resolve_backend(None, torch.device("cpu"))
    with pytest.raises(ValueError, match="xformers"):
        resolve_backend("xformers", torch.device("cpu"))


@pytest.mark.parametrize("bias_shape", [None, (4, 16, 16), (2, 4, 16, 16)])
def test_flex_attention_matches_written_out_softmax(bias_shape):
    """FlexAttention's score_mod reads the shared or per-sample bias (CPU: forward only)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 16, 8, generator=gen) for _ in range(3))
    bias = torch.randn(bias_shape, generator=gen) if bias_shape else None
    with torch.no_grad():
        torch.testing.assert_close(attention(q, k, v, bias, "flex"), reference_attention(q, k, v, bias),
                                   rtol=1e-5, atol=1e-5)


def test_flex_attention_refuses_a_cpu_backward_in_one_sentence():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with pytest.raises(ValueError, match="'flex' has no backward on the CPU.*use 'sdpa'"):
        attention(q, q, q, None, "flex")


def test_a_model_with_the_flex_backend_computes_what_sdpa_computes():
    from mdt.models import create_model

    torch.manual_seed(0)
    sdpa = create_model("MDTv2-T/2", input_size=8, num_classes=4, attention_backend="sdpa").eval()
    flex = create_model("MDTv2-T/2", input_size=8, num_classes=4, attention_backend="flex").eval()
    flex.load_state_dict(sdpa.state_dict())
    for module in [*sdpa.modules(), *flex.modules()]:  # adaLN starts at zero: give the blocks an effect
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05, generator=torch.Generator().manual_seed(2))
    flex.load_state_dict(sdpa.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 4])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::3] = True
    with torch.no_grad():
        for m in (None, mask):
            torch.testing.assert_close(flex(x, t, y, m), sdpa(x, t, y, m), rtol=1e-5, atol=1e-5)
