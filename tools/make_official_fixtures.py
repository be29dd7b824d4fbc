"""Make golden test fixtures (tests/fixtures/official/) with the OFFICIAL DiT and MDT research code.

Sources (the script checks each directory is a git work tree at this commit; it warns if it cannot tell):

* facebookresearch/DiT  ed81ce2229091fd4ecc9a223645f95cf379d582b  (models.py, diffusion/)
* sail-sg/MDT, MDTv2, branch main   7d26c2162c462bd0b90f97f3a1c36cdaaac616ec  (masked_diffusion/)
* sail-sg/MDT, MDTv1, branch mdtv1  71a0f94f8074e201691366b7404205e7f8596bc7  (masked_diffusion/)

Work trees outside this repository, from clones (or mirrors) of the two repositories::

    git -C DiT.git worktree add --detach /tmp/official/dit   ed81ce2229091fd4ecc9a223645f95cf379d582b
    git -C MDT.git worktree add --detach /tmp/official/mdtv2 7d26c2162c462bd0b90f97f3a1c36cdaaac616ec
    git -C MDT.git worktree add --detach /tmp/official/mdtv1 71a0f94f8074e201691366b7404205e7f8596bc7

The official models import timm, needed ONLY by this script (never by mdt or its tests)::

    .venv/bin/pip install --no-deps --target /tmp/timm-site timm        # timm 1.0.31 was used
    PYTHONPATH=/tmp/timm-site .venv/bin/python tools/make_official_fixtures.py \\
        --dit /tmp/official/dit --mdtv2 /tmp/official/mdtv2 --mdtv1 /tmp/official/mdtv1

Only the official modules needed are imported, from file paths under private package names
(masked_diffusion/__init__.py imports just gaussian_diffusion and respace). timm's fused attention is
switched off, so DiT's timm Attention computes softmax(q k^T * scale) v explicitly, like MDT's Attention.

Each official model is built, then EVERY floating parameter and buffer (also the zero-initialised adaLN
and final layers, pos_embed, decoder_pos_embed, mask_token, relative_position_bias_table) is overwritten
with torch.randn_like(p) * PARAM_STD; integer buffers (relative_position_index) are kept. Outputs use
model.eval() (no label dropout), float32, CPU, one thread, torch.manual_seed(SEED) at the start of each
fixture. Each .safetensors file holds the official state_dict() under "state_dict.<official key>", the
inputs and outputs, and a metadata entry "fixture": a JSON description (kwargs, commit, seed, respacing,
mask ratios, diffusion settings). Files are written atomically. Tests never need the official code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import inspect
import io
import json
import sys
import warnings
from pathlib import Path

import torch

from fixture_utils import atomic_write, check_checkout, save_fixture

DIT_COMMIT = "ed81ce2229091fd4ecc9a223645f95cf379d582b"
MDTV2_COMMIT = "7d26c2162c462bd0b90f97f3a1c36cdaaac616ec"
MDTV1_COMMIT = "71a0f94f8074e201691366b7404205e7f8596bc7"
SEED = 0
PARAM_STD = 0.1  # keeps activations and outputs O(1)
NUM_CLASSES = 10  # label NUM_CLASSES is the null (classifier-free guidance) class
SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, num_heads=4, num_classes=NUM_CLASSES,
             learn_sigma=True)
DIT_KWARGS = dict(SMALL, depth=3, mlp_ratio=4.0, class_dropout_prob=0.1)
MDTV2_KWARGS = dict(SMALL, depth=6, mlp_ratio=4.0, class_dropout_prob=0.1, mask_ratio=0.3, decode_layer=2)
MDTV1_KWARGS = dict(SMALL, depth=5, mask_ratio=0.3, decode_layer=2)
CFG_SCALE = 4.0
RESPACING_COUNTS = [*range(1, 301), 333, 500, 999, 1000]


def import_path(name: str, path: Path, package: bool = False):
    """Import a file (or a package directory, whose relative imports then resolve) as module ``name``."""
    location = path / "__init__.py" if package else path
    search = [str(path)] if package else None
    spec = importlib.util.spec_from_file_location(name, location, submodule_search_locations=search)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(cls, kwargs: dict):
    """Construct an official model (silencing its prints); return it and its kwargs with defaults."""
    with contextlib.redirect_stdout(io.StringIO()):
        model = cls(**kwargs)
    bound = inspect.signature(cls).bind(**kwargs)
    bound.apply_defaults()
    return model, dict(bound.arguments)


def randomized(cls, kwargs: dict):
    """Seeded official model in eval mode with every floating tensor random; also its metadata."""
    torch.manual_seed(SEED)
    model, full_kwargs = build(cls, kwargs)
    kept = []
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * PARAM_STD)
            else:
                kept.append(name)
    meta = {"model": cls.__name__, "kwargs": full_kwargs, "seed": SEED, "param_std": PARAM_STD,
            "not_randomized": kept}
    return model.eval(), meta


@contextlib.contextmanager
def record_randn_like(gd_module):
    """Record every ``th.randn_like`` draw made inside the official gaussian_diffusion module."""
    draws, real = [], gd_module.th

    class TorchProxy:
        def __getattr__(self, attr):
            return getattr(real, attr)

        @staticmethod
        def randn_like(*args, **kwargs):
            draws.append(real.randn_like(*args, **kwargs))
            return draws[-1].clone()

    gd_module.th = TorchProxy()
    try:
        yield draws
    finally:
        gd_module.th = real


@contextlib.contextmanager
def record_masking(model):
    """Record (mask_ratio, mask, ids_keep) of each call of the instance's ``random_masking``."""
    calls, original = [], model.random_masking

    def wrapper(x, mask_ratio):
        out = original(x, mask_ratio)
        calls.append((mask_ratio, out[1], out[3]))
        return out

    model.random_masking = wrapper
    try:
        yield calls
    finally:
        del model.random_masking


def mask_tensors(calls, prefix: str) -> tuple[dict, dict]:
    """The one masking call as tensors (bool mask, True = removed; ids_keep as returned) and metadata."""
    assert len(calls) == 1, f"expected one masking call, got {len(calls)}"
    ratio, mask, ids_keep = calls[0]
    is_tensor = isinstance(ratio, torch.Tensor)
    kind = f"tensor {ratio.dtype} {list(ratio.shape)}" if is_tensor else type(ratio).__name__
    meta = {"mask_ratio": float(ratio), "mask_ratio_type": kind, "len_keep": ids_keep.shape[1]}
    return {f"{prefix}.mask": mask == 1, f"{prefix}.ids_keep": ids_keep}, meta


def save_model_fixture(path: Path, model, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The official model's state_dict under "state_dict.<key>", beside the given tensors."""
    save_fixture(path, {**{f"state_dict.{k}": v for k, v in model.state_dict().items()}, **tensors}, meta)


def cfg_sample(diffusion, model, loop: str, z: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """A sampling loop with classifier-free guidance exactly as DiT's sample.py; returns the cond half."""
    z2 = torch.cat([z, z])
    model_kwargs = dict(y=torch.cat([y, torch.full_like(y, NUM_CLASSES)]), cfg_scale=CFG_SCALE)
    out = getattr(diffusion, loop)(model.forward_with_cfg, z2.shape, z2, clip_denoised=False,
                                   model_kwargs=model_kwargs, progress=False, device="cpu", **kwargs)
    return out[: len(z)]


def respacing_table(space_timesteps, prefix: str, fmt: str, counts) -> dict[str, torch.Tensor]:
    """Sorted ``space_timesteps(1000, fmt.format(n))`` for each n that does not raise, concatenated."""
    ok, lengths, steps = [], [], []
    for n in counts:
        try:
            spaced = sorted(space_timesteps(1000, fmt.format(n)))
        except ValueError:
            continue
        ok, lengths, steps = [*ok, n], [*lengths, len(spaced)], steps + spaced
    return {f"respacing.{prefix}counts": torch.tensor(ok),
            f"respacing.{prefix}lengths": torch.tensor(lengths),
            f"respacing.{prefix}steps": torch.tensor(steps)}


def make_dit(models, diffusion_pkg, gd, out: Path, meta: dict) -> None:
    model, model_meta = randomized(models.DiT, DIT_KWARGS)
    assert not getattr(model.blocks[0].attn, "fused_attn", False), "timm fused attention is on"
    meta.update(model_meta, timm_fused_attn=False)
    sampler = {"cfg_scale": CFG_SCALE, "guided_channels": 3, "null_class": NUM_CLASSES,
               "clip_denoised": False,
               "diffusion": "official create_diffusion(respacing) defaults: linear betas, 1000 steps, "
                            "learn_sigma=True (LEARNED_RANGE), EPSILON, MSE"}
    with torch.no_grad():
        x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 417, 999]), torch.tensor([3, 7, NUM_CLASSES])
        tensors = {"input.x": x, "input.t": t, "input.y": y, "output": model(x, t, y)}

        ddpm = diffusion_pkg.create_diffusion(str(21))
        z, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 6])
        with record_randn_like(gd) as draws:
            tensors["ddpm.out"] = cfg_sample(ddpm, model, "p_sample_loop", z, y)
        assert len(draws) == ddpm.num_timesteps, (len(draws), ddpm.num_timesteps)
        tensors.update({"ddpm.z": z, "ddpm.y": y,
                        "ddpm.step_noise": torch.stack([d[: len(z)] for d in draws]),
                        "ddpm.timesteps": torch.tensor(sorted(ddpm.timestep_map))})
        meta["ddpm"] = dict(sampler, respacing="21", steps=len(draws),
                            step_noise="first half of each th.randn_like draw of p_sample, highest t first")

        ddim, stride = diffusion_pkg.create_diffusion(str(7)), diffusion_pkg.create_diffusion("ddim10")
        z, y = torch.randn(2, 4, 8, 8), torch.tensor([2, 9])
        tensors.update({"ddim.z": z, "ddim.y": y, "ddim.timesteps": torch.tensor(sorted(ddim.timestep_map)),
                        "ddim.out": cfg_sample(ddim, model, "ddim_sample_loop", z, y, eta=0.0),
                        "ddim_stride.timesteps": torch.tensor(sorted(stride.timestep_map)),
                        "ddim_stride.out": cfg_sample(stride, model, "ddim_sample_loop", z, y, eta=0.0)})
        meta["ddim"] = dict(sampler, respacing="7", eta=0.0)
        meta["ddim_stride"] = dict(sampler, respacing="ddim10", eta=0.0, z_y="ddim.z, ddim.y")
    tensors.update(respacing_table(diffusion_pkg.space_timesteps, "", "{}", RESPACING_COUNTS))
    tensors.update(respacing_table(diffusion_pkg.space_timesteps, "ddim_", "ddim{}", range(1, 301)))
    meta["respacing"] = {"num_timesteps": 1000, "counts_format": "{N}", "ddim_counts_format": "ddim{N}",
                         "steps": "sorted space_timesteps of each N, concatenated; lengths[i] steps for N"}
    save_model_fixture(out / "dit.safetensors", model, tensors, meta)


def official_losses(diffusion, model, x0, t, model_kwargs, noise):
    """``diffusion.training_losses`` plus the one model output and the masking calls it made."""
    outputs = []

    def recording_model(*args, **kwargs):
        outputs.append(model(*args, **kwargs))
        return outputs[-1]

    with record_masking(model) as calls:
        terms = diffusion.training_losses(recording_model, x0, t, model_kwargs=model_kwargs, noise=noise)
    assert len(outputs) == 1 and set(terms) == {"mse", "vb", "loss"}, (len(outputs), set(terms))
    return terms, outputs[0], calls


def make_mdt(path: Path, cls, kwargs: dict, pkg, meta: dict) -> None:
    model, model_meta = randomized(cls, kwargs)
    meta.update(model_meta)
    with torch.no_grad():
        x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 417, 999]), torch.tensor([3, 7, NUM_CLASSES])
        tensors = {"input.x": x, "input.t": t, "input.y": y, "output.full": model(x, t, y)}
        with record_masking(model) as calls:
            tensors["output.masked"] = model(x, t, y, enable_mask=True)
        masks, meta["output_masked"] = mask_tensors(calls, "input")
        tensors.update(masks)

        # As scripts/image_train.py: create_diffusion(**diffusion_defaults()) with --diffusion_steps 1000.
        diffusion_kwargs = dict(pkg.diffusion_defaults(), diffusion_steps=1000)
        diffusion = pkg.create_diffusion(**diffusion_kwargs)
        x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
        t, y = torch.tensor([0, 1, 500]), torch.tensor([2, 5, 9])
        tensors.update({"loss.x0": x0, "loss.t": t, "loss.y": y, "loss.noise": noise})
        for part, extra in [("full", {}), ("masked", {"enable_mask": True})]:
            terms, output, calls = official_losses(diffusion, model, x0, t, {"y": y, **extra}, noise)
            tensors.update({f"loss.{part}.{k}": terms[k] for k in ("mse", "vb", "loss")})
            tensors[f"loss.{part}.model_output"] = output
            unweighted = ((noise - output[:, :4]) ** 2).mean(dim=(1, 2, 3))
            meta[f"loss_{part}"] = {"mse_weight_observed": (terms["mse"] / unweighted).tolist()}
            if extra:
                masks, mask_meta = mask_tensors(calls, "loss.masked")
                tensors.update(masks)
                meta["loss_masked"].update(mask_meta)
    meta["diffusion"] = {"create_diffusion_kwargs": diffusion_kwargs, "loss_type": diffusion.loss_type.name,
                         "model_mean_type": diffusion.model_mean_type.name,
                         "model_var_type": diffusion.model_var_type.name,
                         "num_timesteps": diffusion.num_timesteps}
    save_model_fixture(path, model, tensors, meta)


def make_param_counts(path: Path, specs: dict) -> None:
    """Parameter counts of official XL/2 models (input_size 32, 1000 classes), built on the meta device."""
    result = {"requires_grad": {}, "relative_position_bias_table_rows": {}, "settings": {}}
    for label, (constructor, extra) in specs.items():
        kwargs = dict(input_size=32, num_classes=1000, **extra)
        with torch.device("meta"):
            model, _ = build(constructor, kwargs)
        params = list(model.parameters())
        result[label] = sum(p.numel() for p in params)
        result["requires_grad"][label] = sum(p.numel() for p in params if p.requires_grad)
        rows = {p.shape[0] for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
        if rows:
            result["relative_position_bias_table_rows"][label] = rows.pop()
        result["settings"][label] = dict(kwargs, constructor=constructor.__name__)
    result["note"] = ("sum(p.numel() for p in model.parameters()); requires_grad: only trainable ones; "
                      "buffers are not counted. Bias table rows per attention layer = (2*16-1)**2 + 3 "
                      "for the 16x16 token grid; the last 3 rows are never indexed.")
    result["commits"] = {"DiT": DIT_COMMIT, "MDTv2": MDTV2_COMMIT, "MDTv1": MDTV1_COMMIT}
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dit", type=Path, required=True, help="DiT work tree (models.py, diffusion/)")
    parser.add_argument("--mdtv2", type=Path, required=True, help="MDT work tree at the main-branch commit")
    parser.add_argument("--mdtv1", type=Path, required=True, help="MDT work tree at the mdtv1-branch commit")
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm.models.layers is deprecated
    warnings.filterwarnings("ignore", message=".*meshgrid.*")  # torch.meshgrid without indexing=
    import timm  # needed by the official models only
    from timm.layers import set_fused_attn

    set_fused_attn(False)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = [("dit", "facebookresearch/DiT", args.dit, DIT_COMMIT),
               ("mdtv2", "sail-sg/MDT", args.mdtv2, MDTV2_COMMIT),
               ("mdtv1", "sail-sg/MDT", args.mdtv1, MDTV1_COMMIT)]
    common = {"torch_version": torch.__version__, "timm_version": timm.__version__}
    meta = {name: dict(common, name=name, repo=repo, commit=commit,
                       commit_verified=check_checkout(path, commit)) for name, repo, path, commit in sources}

    dit_models = import_path("official_dit_models", args.dit / "models.py")
    dit_diffusion = import_path("official_dit_diffusion", args.dit / "diffusion", package=True)
    make_dit(dit_models, dit_diffusion, sys.modules["official_dit_diffusion.gaussian_diffusion"], args.out,
             meta["dit"])
    mdt = {}
    for name, root in [("mdtv2", args.mdtv2), ("mdtv1", args.mdtv1)]:
        pkg = import_path(f"official_{name}", root / "masked_diffusion", package=True)
        mdt[name] = import_path(f"official_{name}.models", root / "masked_diffusion" / "models.py")
        cls, kwargs = (mdt[name].MDTv2, MDTV2_KWARGS) if name == "mdtv2" else (mdt[name].MDT, MDTV1_KWARGS)
        make_mdt(args.out / f"{name}.safetensors", cls, kwargs, pkg, meta[name])
    make_param_counts(args.out / "param_counts.json", {
        "DiT-XL/2": (dit_models.DiT_XL_2, {}),
        "MDTv2-XL/2": (mdt["mdtv2"].MDTv2_XL_2, {"decode_layer": 4, "mask_ratio": 0.3}),
        "MDT-XL/2": (mdt["mdtv1"].MDT_XL_2, {"decode_layer": 2, "mask_ratio": 0.3})})


if __name__ == "__main__":
    main()
