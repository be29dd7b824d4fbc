"""Multi-head self-attention with an optional additive bias, over two interchangeable backends.

Backends: PyTorch `scaled_dot_product_attention` (CPU and GPU, always available), xformers
`memory_efficient_attention` (CUDA only, optional) and PyTorch FlexAttention (`flex`: the bias is
added by a `score_mod` that reads it, so it is never expanded per sample; compiled on CUDA; on the
CPU forward only, as torch has no CPU backward for it). `auto` picks xformers for CUDA tensors when
it is installed, SDPA otherwise; `MDT_ATTENTION_BACKEND=sdpa|xformers|flex|auto` overrides the
default of every module, and a module's `backend` argument overrides both.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("auto", "sdpa", "xformers", "flex")
ENV_VAR = "MDT_ATTENTION_BACKEND"


@functools.cache
def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


_USABLE: dict[torch.device, bool] = {}  # a plain dict: torch.compile reads it as a constant


def xformers_usable(device: torch.device) -> bool:
    """Whether xformers has working kernels for `device`.

    A wheel built for another torch release imports fine but has no CUDA operators, so `auto`
    tries one tiny call before choosing it (and falls back to SDPA with a warning). The answer is
    kept per device; `mdt.compiling` asks once before compiling, so the probe is never traced.
    """
    if device not in _USABLE:
        _USABLE[device] = _probe_xformers(device)
    return _USABLE[device]


def _probe_xformers(device: torch.device) -> bool:
    if device.type != "cuda" or not xformers_available():
        return False
    import xformers.ops as xops

    q = torch.zeros(1, 8, 1, 64, device=device, dtype=torch.bfloat16)
    try:
        xops.memory_efficient_attention(q, q, q)
    except (NotImplementedError, RuntimeError) as err:
        warnings.warn(f"xformers is installed but cannot run on {device} ({str(err).splitlines()[0]}); "
                      "using PyTorch SDPA", stacklevel=2)
        return False
    return True


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend that will run on `device`: 'sdpa', 'xformers' or 'flex'."""
    choice = requested or os.environ.get(ENV_VAR, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {choice!r} (check {ENV_VAR})")
    if choice == "auto":
        return "xformers" if xformers_usable(device) else "sdpa"
    if choice == "xformers":
        if not xformers_available():
            raise ValueError("attention backend 'xformers' was requested but xformers is not installed; "
                             "install the `xformers` extra or use 'sdpa'")
        if device.type != "cuda":
            raise ValueError("attention backend 'xformers' has no CPU kernels; use 'sdpa' on CPU")
    return choice


def _xformers_bias(bias: torch.Tensor, batch: int, q: torch.Tensor) -> torch.Tensor:
    """xformers wants a (B, H, Mq, Mk) bias whose row stride is a multiple of 8 elements.

    Gradients reach the bias only through a full contiguous tensor, so when it needs them the
    per-sample copy is unavoidable here (SDPA broadcasts a shared (H, N, N) bias instead).
    """
    heads, n_q, n_k = bias.shape[-3:]
    padded = (n_k + 7) // 8 * 8
    storage = torch.empty(batch, heads, n_q, padded, dtype=q.dtype, device=q.device)
    out = storage[..., :n_k]
    out.copy_(bias.to(q.dtype).expand(batch, heads, n_q, n_k))
    return out


def _explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The written-out product. On CPU, SDPA falls back to its math kernel for a bias that needs
    gradients, and these three ops are faster than that kernel (tools/benchmarks/bench_model.py)."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) + bias  # (B, H, N, N)
    return scores.softmax(dim=-1) @ v


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=None)


def _flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """FlexAttention with the bias read per score: (H, N, N) by head, (B, H, N, N) by sample and head."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias)):
            raise ValueError("attention backend 'flex' has no backward on the CPU in this torch; use 'sdpa' to "
                             "train on the CPU")
        # It refuses leaves that require grad even under no_grad.
        q, k, v = q.detach(), k.detach(), v.detach()
        bias = bias.detach() if bias is not None else None
    score_mod = None
    if bias is not None and bias.dim() == 3:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx]
    elif bias is not None:
        def score_mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx]
    if q.device.type == "cuda":
        return _compiled_flex_attention()(q, k, v, score_mod=score_mod)
    with warnings.catch_warnings():  # on the CPU the unfused reference is what there is
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, score_mod=score_mod)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + bias) v.

    q, k, v: (B, H, N, d). bias: None, (H, N, N) shared by the batch, or (B, H, N, N).
    Returns (B, H, N, d).
    """
    chosen = resolve_backend(backend, q.device)
    if bias is not None:
        bias = bias.to(q.dtype)
    if chosen == "sdpa":
        if bias is not None and bias.requires_grad and q.device.type == "cpu":
            return _explicit_attention(q, k, v, bias)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if chosen == "flex":
        return _flex_attention(q, k, v, bias)
    import xformers.ops as xops

    attn_bias = _xformers_bias(bias, q.shape[0], q) if bias is not None else None
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias
    )  # xformers layout is (B, N, H, d)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; `qkv_bias=False` for MaskDM's U-ViT."""

    def __init__(self, dim: int, num_heads: int, backend: str | None = None, *, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d_head)
        out = attention(q, k, v, bias, self.backend)  # (B, H, N, d_head)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))
