"""Make golden test fixtures (tests/fixtures/official/maskdm*) with the OFFICIAL MaskDM research code.

Source: jiachenlei/maskdm 0e79a60f71b38d0bc8a2887abb65229c0c935d14 (the script checks the directory is a git
work tree at this commit; it warns if it cannot tell)::

    git -C maskdm.git worktree add --detach /tmp/official/maskdm 0e79a60f71b38d0bc8a2887abb65229c0c935d14
    .venv/bin/pip install --no-deps --target /tmp/timm-site timm        # timm 1.0.31 was used
    PYTHONPATH=/tmp/timm-site .venv/bin/python tools/make_maskdm_fixtures.py --maskdm /tmp/official/maskdm

Only models/mask_uvit.py, gaussian_ddpm.py, utils/helper.py and datasets/masking_generator.py are imported,
from file paths, under the names they import each other by (utils.helper; an empty stand-in for pywt, which
gaussian_ddpm.py imports and never calls); the names leave sys.modules afterwards. xformers is not installed,
so the official Attention takes its written-out branch (softmax(q * scale @ k^T) v).

Tiny models: the official MaskedUViT(img_size=8, patch_size=2, in_chans=3, encoder_embed_dim=16,
encoder_depth=2 (1 in-block, the middle block, 1 out-block), encoder_heads=2, mlp_ratio=2, qkv_bias=False,
mlp_time_embed=False), unconditional (num_classes=-1) and conditional (num_classes=5). EVERY parameter (also
LayerNorm weights and biases, encoder_pos_embed, uncond_embed) is overwritten with torch.randn_like(p) *
PARAM_STD in named_parameters() order after torch.manual_seed(SEED). Float32, CPU, one thread, eval mode
(the model has no active dropout), torch.manual_seed(SEED) again at the start of each fixture.

* maskdm.safetensors: "uncond.state_dict.<key>" / "cond.state_dict.<key>" = MaskedUViT.state_dict();
  inputs x, t, y; outputs of model(x, t) (a full image) and model(x, t, mask) (tokens (B, K, p*p*C) of the
  visible patches, in grid order), the mask drawn by the official RandomBlockMaskingGenerator(4, 0.5, 2)
  with the official leading 0 per extra token; conditional outputs with labels and with y=None.
* maskdm_loss.safetensors: the official GaussianDiffusion (cosine betas, T=1000, loss_type "l2" as main.py
  sets it) around the unconditional tiny model (its weights: maskdm.safetensors' uncond.state_dict, checked
  equal): its schedule buffers ("diffusion.<key>"; with "model." + the weights, the layout of a released
  checkpoint's "model" entry), and GaussianDiffusion.forward([img, mask])
  with the t (torch.randint) and noise (torch.randn_like) it drew recorded: the pre-training loss (block mask,
  ratio 0.5) and the fine-tuning loss (ratio 0: MASK_RATIO 0 gives an all-zero mask).
* maskdm_ddim.safetensors: the official GaussianDiffusion (cosine, T=1000, clip_denoised on, as eval.py builds
  it) around the same unconditional tiny model: ddim_sample((3, 3, 8, 8)) with eta 1 at 10 steps and eta 0 at
  7 steps, its torch.randn start and per-step torch.randn_like noise recorded ("<name>.noise", stacked
  "<name>.step_noise"), the visited times, and the returned images (in [0, 1], normalization on).
* maskdm_masks.json: per setting, the official generators' dropped-token counts over DRAWS draws
  (np.random seeded with SEED) and, on grids up to 16, the per-position drop frequencies.
* maskdm_param_counts.json: the official MaskDM-B and "small" U-ViT (256 px, patch 4), meta device.

Each .safetensors file has a metadata entry "fixture": a JSON description. Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file as safe_load

from fixture_utils import atomic_write, check_checkout, save_fixture

MASKDM_COMMIT = "0e79a60f71b38d0bc8a2887abb65229c0c935d14"
SEED = 0
PARAM_STD = 0.1  # keeps activations and outputs O(1)
TINY = dict(img_size=8, patch_size=2, in_chans=3, encoder_embed_dim=16, encoder_depth=2, encoder_heads=2,
            mlp_ratio=2, qkv_bias=False, mlp_time_embed=False)
NUM_CLASSES = 5
GRID, MASK_RATIO, BLOCK = 4, 0.5, 2
DRAWS = 4000
# (strategy, grid, ratio, block or crop size): the CelebA-HQ 256 recipe's grid (64) and settings where the
# official counts differ from rounding (ratio 0.97 at block 2; 0.9 patch on 4096 tokens).
MASK_SETTINGS = [("patch", 64, 0.9, None), ("patch", 8, 0.7, None), ("block", 64, 0.9, 4), ("block", 8, 0.97, 2),
                 ("block", 8, 0.5, 2), ("crop", 16, 0.9, 5), ("crop", 8, 0.0, 3)]
FIXTURES = ("network", "loss", "ddim", "masks", "param_counts")
ALIASES = ("utils", "utils.helper", "pywt", "mask_uvit", "gaussian_ddpm", "masking_generator")


def import_official(root: Path) -> types.SimpleNamespace:
    saved = {name: sys.modules.pop(name) for name in ALIASES if name in sys.modules}

    def load(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, root / path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    try:
        sys.modules["utils"], sys.modules["pywt"] = types.ModuleType("utils"), types.ModuleType("pywt")
        sys.modules["utils"].helper = load("utils.helper", "utils/helper.py")
        uvit = load("mask_uvit", "models/mask_uvit.py")
        ddpm = load("gaussian_ddpm", "gaussian_ddpm.py")
        masks = load("masking_generator", "datasets/masking_generator.py")
    finally:
        for name in ALIASES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    assert uvit.ATTENTION == "vanilla", "xformers is installed: the official attention would take its branch"
    return types.SimpleNamespace(uvit=uvit, ddpm=ddpm, masks=masks)


def randomize(net: torch.nn.Module) -> None:
    torch.manual_seed(SEED)
    with torch.no_grad():
        for _, tensor in net.named_parameters():
            tensor.copy_(torch.randn_like(tensor) * PARAM_STD)
    assert not list(net.named_buffers())


def official_block_masks(official, batch: int, extras: int) -> torch.Tensor:
    """(B, extras + N) bool, True = dropped, as the dataset's __getitem__ builds it (a 0 per extra token)."""
    generator = official.masks.RandomBlockMaskingGenerator(GRID, MASK_RATIO, BLOCK)
    rows = [np.concatenate([np.zeros(extras), generator()]) for _ in range(batch)]
    return torch.from_numpy(np.stack(rows)).bool()


def make_network(official, out: Path, meta: dict) -> None:
    tensors, np_state = {}, np.random.get_state()
    np.random.seed(SEED)
    for name, classes in (("uncond", -1), ("cond", NUM_CLASSES)):
        net = official.uvit.MaskedUViT(**TINY, num_classes=classes)
        randomize(net)
        net.eval()
        torch.manual_seed(SEED)
        x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 417, 999])
        mask = official_block_masks(official, 3, net.extras)
        tensors.update({f"{name}.state_dict.{k}": v for k, v in net.state_dict().items()})
        tensors.update({f"{name}.x": x, f"{name}.t": t, f"{name}.mask": mask[:, net.extras:]})
        with torch.no_grad():
            if classes > 0:
                y = torch.tensor([1, 4, 0])
                tensors.update({f"{name}.y": y, f"{name}.full": net(x, t, y=y),
                                f"{name}.masked": net(x, t, mask=mask, y=y),
                                f"{name}.null_full": net(x, t), f"{name}.null_masked": net(x, t, mask=mask)})
            else:
                tensors.update({f"{name}.full": net(x, t), f"{name}.masked": net(x, t, mask=mask)})
    np.random.set_state(np_state)
    meta.update(tiny=TINY, num_classes={"uncond": -1, "cond": NUM_CLASSES}, seed=SEED, param_std=PARAM_STD,
                mask=f"RandomBlockMaskingGenerator({GRID}, {MASK_RATIO}, {BLOCK}) per sample, np.random.seed({SEED}); "
                     "stored without the extra tokens' leading zeros (True = dropped)",
                outputs="full: net(x, t[, y=y]) -> (B, 3, 8, 8); masked: net(x, t, mask=mask[, y=y]) -> (B, K, 12) "
                        "tokens of the visible patches in grid order; null_*: y=None (uncond_embed)")
    save_fixture(out / "maskdm.safetensors", tensors, meta)


@contextlib.contextmanager
def recorded_draws(ddpm):
    """Record torch.randint (timesteps), torch.randn and torch.randn_like (noise) as gaussian_ddpm.py calls them."""
    real = ddpm.torch
    log = {"randint": [], "randn_like": [], "randn": []}

    class TorchProxy:
        def __getattr__(self, attr):
            return getattr(real, attr)

        @staticmethod
        def randint(*args, **kwargs):
            log["randint"].append(real.randint(*args, **kwargs))
            return log["randint"][-1].clone()

        @staticmethod
        def randn_like(*args, **kwargs):
            log["randn_like"].append(real.randn_like(*args, **kwargs))
            return log["randn_like"][-1].clone()

        @staticmethod
        def randn(*args, **kwargs):
            log["randn"].append(real.randn(*args, **kwargs))
            return log["randn"][-1].clone()

    ddpm.torch = TorchProxy()
    try:
        yield log
    finally:
        ddpm.torch = real


def stored_unconditional_net(official, out: Path):
    """The official tiny unconditional U-ViT with the weights of maskdm.safetensors (checked equal)."""
    net = official.uvit.MaskedUViT(**TINY, num_classes=-1)
    randomize(net)
    stored = safe_load(out / "maskdm.safetensors")
    assert all(torch.equal(v, stored[f"uncond.state_dict.{k}"]) for k, v in net.state_dict().items())
    return net


def make_loss(official, out: Path, meta: dict) -> None:
    net = stored_unconditional_net(official, out)
    diffusion = official.ddpm.GaussianDiffusion(net, image_size=8, timesteps=1000, sampling_timesteps=500,
                                                loss_type="l2", beta_schedule="cosine", channels=3)
    diffusion.eval()
    torch.manual_seed(SEED)
    np_state = np.random.get_state()
    np.random.seed(SEED + 1)
    images = torch.rand(4, 3, 8, 8)  # the dataset's ToTensor range [0, 1]; forward maps it to [-1, 1]
    tensors = {f"diffusion.{k}": v for k, v in diffusion.state_dict().items() if not k.startswith("model.")}
    tensors["loss.images"] = images
    pretrain_mask = official_block_masks(official, 4, 1)
    finetune_mask = torch.zeros(4, 1 + GRID * GRID, dtype=torch.bool)
    np.random.set_state(np_state)
    with torch.no_grad():
        for name, mask in (("pretrain", pretrain_mask), ("finetune", finetune_mask)):
            with recorded_draws(official.ddpm) as log:
                loss = diffusion([images, mask.float()])["loss"]
            (t,), (noise,) = log["randint"], log["randn_like"]
            tensors.update({f"{name}.mask": mask[:, 1:], f"{name}.t": t, f"{name}.noise": noise,
                            f"{name}.loss": loss})
    meta.update(tiny=TINY, seed=SEED, param_std=PARAM_STD,
                diffusion="GaussianDiffusion(net, image_size=8, timesteps=1000, sampling_timesteps=500, loss_type="
                          "'l2', beta_schedule='cosine', channels=3); normalization on (x0 = 2 img - 1)",
                loss="diffusion([loss.images, mask]) with its torch.randint timesteps and randn_like noise recorded "
                     "as <stage>.t/<stage>.noise; pretrain mask: block 2 at ratio 0.5 on the 4x4 grid; finetune: "
                     "all False (the official MASK_RATIO 0)")
    save_fixture(out / "maskdm_loss.safetensors", tensors, meta)


DDIM_RUNS = (("eta1", 1.0, 10), ("eta0", 0.0, 7))  # (name, eta, sampling steps); 7 steps: a fractional stride


def watch_predictions(diffusion, times: list, clipped: list) -> None:
    """Record each visited t and the fraction of x0 the clip changes (to show the clip matters)."""
    real = diffusion.model_predictions

    def predictions(x, t, *args, **kwargs):
        times.append(t[0].item())
        unclipped = diffusion.predict_start_from_noise(x, t, diffusion.model(x, t))
        clipped.append(round(float((unclipped.abs() > 1).float().mean()), 4))
        return real(x, t, *args, **kwargs)

    diffusion.model_predictions = predictions


def make_ddim(official, out: Path, meta: dict) -> None:
    net = stored_unconditional_net(official, out)
    net.eval()
    tensors, clipped = {}, {}
    for name, eta, steps in DDIM_RUNS:
        diffusion = official.ddpm.GaussianDiffusion(net, image_size=8, timesteps=1000, sampling_timesteps=steps,
                                                    loss_type="l2", beta_schedule="cosine", ddim_sampling_eta=eta,
                                                    clip_denoised=True, channels=3)
        diffusion.eval()
        seen, clipped[name] = [], []
        watch_predictions(diffusion, seen, clipped[name])
        torch.manual_seed(SEED)
        with torch.no_grad(), recorded_draws(official.ddpm) as log:
            images = diffusion.ddim_sample((3, 3, 8, 8))
        (start,), step_noise = log["randn"], log["randn_like"]
        assert len(step_noise) == steps - 1  # none into x_0
        tensors.update({f"{name}.noise": start, f"{name}.step_noise": torch.stack(step_noise),
                        f"{name}.times": torch.tensor(seen), f"{name}.images": images})
    meta.update(tiny=TINY, seed=SEED, param_std=PARAM_STD, runs={n: dict(eta=e, steps=k) for n, e, k in DDIM_RUNS},
                clipped_fraction_per_step=clipped,
                sampler="GaussianDiffusion(net, image_size=8, timesteps=1000, sampling_timesteps=<steps>, beta_schedule="
                        "'cosine', ddim_sampling_eta=<eta>, clip_denoised=True, channels=3).ddim_sample((3, 3, 8, 8)) "
                        "after torch.manual_seed(SEED); <name>.noise: its torch.randn start, <name>.step_noise: its "
                        "torch.randn_like per step, <name>.times: the visited t, <name>.images: the result in [0, 1]")
    save_fixture(out / "maskdm_ddim.safetensors", tensors, meta)


def make_mask_statistics(official, path: Path) -> None:
    np.random.seed(SEED)
    settings = []
    for strategy, grid, ratio, size in MASK_SETTINGS:
        if strategy == "patch":
            generator = official.masks.RandomMaskingGenerator(grid, ratio)
        elif strategy == "block":
            generator = official.masks.RandomBlockMaskingGenerator(grid, ratio, size)
        else:
            generator = official.masks.CropMaskingGenerator(grid, size)
        draws = np.stack([generator() for _ in range(DRAWS)])  # (DRAWS, N), 1 = dropped
        counts = sorted({int(c) for c in draws.sum(1)})
        setting = dict(strategy=strategy, grid=grid, ratio=ratio, size=size, dropped_counts=counts)
        if grid <= 16:
            setting["drop_frequency"] = [round(float(f), 4) for f in draws.mean(0)]
        settings.append(setting)
    result = dict(commit=MASKDM_COMMIT, seed=SEED, draws=DRAWS, settings=settings,
                  note="official generators of datasets/masking_generator.py; size = block size (tokens per "
                       "block side) or crop size (window side in tokens); 1 = dropped")
    text = json.dumps(result, indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def make_param_counts(official, path: Path) -> None:
    result = {"settings": {}}
    for label, width, depth, heads in [("MaskDM-B (celebahq_base_90p.yml)", 768, 12, 12),
                                       ("small (celebahq_small_90p.yml)", 512, 13, 8)]:
        kwargs = dict(img_size=256, patch_size=4, in_chans=3, encoder_embed_dim=width, encoder_depth=depth,
                      encoder_heads=heads, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=-1)
        with torch.device("meta"):
            net = official.uvit.MaskedUViT(**kwargs)
        result[label] = sum(p.numel() for p in net.parameters())
        result["settings"][label] = kwargs
    result.update(commit=MASKDM_COMMIT, note="sum(p.numel() for p in MaskedUViT(...).parameters()), meta device")
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maskdm", type=Path, required=True, help="maskdm work tree at the commit")
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--only", choices=FIXTURES, nargs="+", default=list(FIXTURES),
                        help="make only these fixtures (the others stay as they are)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import timm  # needed by the official model only

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"name": "maskdm", "repo": "jiachenlei/maskdm", "commit": MASKDM_COMMIT,
            "commit_verified": check_checkout(args.maskdm, MASKDM_COMMIT), "torch_version": torch.__version__,
            "timm_version": timm.__version__, "dtype": "float32"}
    official = import_official(args.maskdm)
    makers = {"network": lambda: make_network(official, args.out, dict(meta)),
              "loss": lambda: make_loss(official, args.out, dict(meta)),
              "ddim": lambda: make_ddim(official, args.out, dict(meta)),
              "masks": lambda: make_mask_statistics(official, args.out / "maskdm_masks.json"),
              "param_counts": lambda: make_param_counts(official, args.out / "maskdm_param_counts.json")}
    for name in FIXTURES:  # in this order: loss and ddim check their weights against the network's fixture
        if name in args.only:
            makers[name]()


if __name__ == "__main__":
    main()
