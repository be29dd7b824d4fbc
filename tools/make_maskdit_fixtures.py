"""Make golden test fixtures (tests/fixtures/official/maskdit*) with the OFFICIAL MaskDiT research code.

Source: Anima-Lab/MaskDiT 73cfb96ca9c6d1d78ab567ffeea099f96692a6e4 (the script checks the directory is a git
work tree at this commit; it warns if it cannot tell). A work tree outside this repository (two PNG blobs
missing from a partial mirror can be skipped: sparse checkout, then ``git update-index --skip-worktree``)::

    git -C MaskDiT.git worktree add --detach /tmp/official/maskdit 73cfb96ca9c6d1d78ab567ffeea099f96692a6e4
    .venv/bin/pip install --no-deps --target /tmp/timm-site timm        # timm 1.0.31 was used
    PYTHONPATH=/tmp/timm-site .venv/bin/python tools/make_maskdit_fixtures.py --maskdit /tmp/official/maskdit

Only models/maskdit.py, utils.py, train_utils/{helper,loss}.py and sample.py are imported, from file paths,
under the names they import each other by (models.maskdit, utils, train_utils.*; empty stand-ins for lmdb and
autoencoder, which sample.py imports and edm_sampler does not use); the names leave sys.modules afterwards.
timm's fused attention is off, so timm's Attention computes softmax(q k^T * scale) v explicitly.

Tiny model: the official EDMPrecond, built as train.py:123-131 builds it (use_decoder=True, mae_loss_coef=0.1,
pad_cls_token=False; sigma_min=0, sigma_max=inf, sigma_data=0.5 by default) with img_resolution 8, 4 channels,
10 classes and model_type "DiT-tiny/2" added to the official DiT_models dict as DiT(depth=3, hidden_size=64,
patch_size=2, num_heads=4) (learn_sigma=False, mlp_ratio=4). The official decoder is hard-coded to width 512,
depth 8, 16 heads (models/maskdit.py:310-312), so its modules are REPLACED by the official classes at width
32, depth 2, 2 heads, as the official __init__ builds them: DecoderLayer(64, 32), 2 x DiTBlock(32, 64, 2,
mlp_ratio=4.0), FinalLayer(32, 64, 2, 4), mask_token zeros (1, 1, 32), decoder_pos_embed =
get_2d_sincos_pos_embed(32, 4) as a frozen parameter. The forward code is the official one, unchanged.
Then EVERY floating parameter (also the zero-initialised adaLN, final and decoder layers, mask_token and
both pos embeds; there are no buffers) is overwritten with torch.randn_like(p) * PARAM_STD in
named_parameters() order after torch.manual_seed(SEED). Float32, CPU, one thread, torch.manual_seed(SEED)
again at the start of each fixture; eval mode except where masking needs train mode (the model has no
dropout: timm Attention/Mlp with p=0, and label dropout is done by train.py).

* maskdit.safetensors: "state_dict.<key>" = EDMPrecond.state_dict() (keys as in the official checkpoints'
  "model"/"ema", e.g. model.x_embedder.proj.weight); the inner DiT's raw output F (input.*, output.full in
  eval mode, output.masked in train mode with an official get_mask draw); the preconditioned D (precond.*:
  eval, train with a mask, guided through forward_with_cfg).
* maskdit_loss_sampler.safetensors (weights: maskdit.safetensors): the official EDMLoss with its random draws
  recorded (loss.*; replayed for loss.full/denoise; mae_loss called directly) and the official edm_sampler
  (sampler.*): unguided, guided, and with churn noise from a recording ``randn_like`` argument.
* maskdit_param_counts.json: the official XL/2 MaskDiT (EDMPrecond as train.py builds it), meta device.

Each .safetensors file has a metadata entry "fixture": a JSON description. Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import io
import json
import sys
import types
import warnings
from pathlib import Path

import torch

from fixture_utils import atomic_write, check_checkout, save_fixture

MASKDIT_COMMIT = "73cfb96ca9c6d1d78ab567ffeea099f96692a6e4"
SEED = 0
PARAM_STD = 0.1  # keeps activations and outputs O(1)
NUM_CLASSES = 10  # the null (classifier-free guidance) label is the all-zero one-hot row
TINY = dict(depth=3, hidden_size=64, patch_size=2, num_heads=4)
DECODER = dict(hidden_size=32, depth=2, num_heads=2, mlp_ratio=4.0)
PRECOND_KWARGS = dict(img_resolution=8, img_channels=4, num_classes=NUM_CLASSES, model_type="DiT-tiny/2",
                      use_decoder=True, mae_loss_coef=0.1, pad_cls_token=False)  # as train.py:123-131
MASK_RATIO, MAE_COEF, CFG_SCALE = 0.5, 0.1, 1.5
SAMPLER = dict(num_steps=6, sigma_min=0.002, sigma_max=80, rho=7)  # edm_sampler defaults but num_steps=18
CHURN = dict(S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)
ALIASES = ("models", "models.maskdit", "utils", "train_utils", "train_utils.helper", "train_utils.loss",
           "lmdb", "autoencoder", "sample")


def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules, imported under the names they import each other by (removed afterwards)."""
    saved = {name: sys.modules.pop(name) for name in ALIASES if name in sys.modules}

    def load(name: str, path: str):
        spec = importlib.util.spec_from_file_location(name, root / path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    try:
        for name in ("models", "train_utils", "lmdb", "autoencoder"):  # bare packages; unused stand-ins
            sys.modules[name] = types.ModuleType(name)
        sys.modules["models"].maskdit = maskdit = load("models.maskdit", "models/maskdit.py")
        load("utils", "utils.py")
        load("train_utils.helper", "train_utils/helper.py")
        loss, sample = load("train_utils.loss", "train_utils/loss.py"), load("sample", "sample.py")
    finally:
        for name in ALIASES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
    return types.SimpleNamespace(maskdit=maskdit, loss=loss, sample=sample)


def build_tiny(maskdit) -> tuple[torch.nn.Module, dict]:
    """Official EDMPrecond around the tiny DiT with small official decoder modules, every float random."""
    maskdit.DiT_models["DiT-tiny/2"] = functools.partial(maskdit.DiT, **TINY)
    torch.manual_seed(SEED)
    net = maskdit.EDMPrecond(**PRECOND_KWARGS)
    dit, width, hidden = net.model, DECODER["hidden_size"], TINY["hidden_size"]
    dit.decoder_layer = maskdit.DecoderLayer(hidden, width)
    dit.decoder_blocks = torch.nn.ModuleList([
        maskdit.DiTBlock(width, hidden, DECODER["num_heads"], mlp_ratio=DECODER["mlp_ratio"])
        for _ in range(DECODER["depth"])])
    dit.final_layer = maskdit.FinalLayer(width, hidden, dit.patch_size, dit.out_channels)
    dit.mask_token = torch.nn.Parameter(torch.zeros(1, 1, width))
    grid = int(dit.x_embedder.num_patches ** 0.5)
    pos = maskdit.get_2d_sincos_pos_embed(width, grid, cls_token=dit.pad_cls_token, extra_tokens=0)
    dit.decoder_pos_embed = torch.nn.Parameter(torch.from_numpy(pos).float()[None], requires_grad=False)
    assert not any(getattr(m, "fused_attn", False) for m in net.modules()), "timm fused attention is on"
    kept = []
    with torch.no_grad():
        for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * PARAM_STD)
            else:
                kept.append(name)
    attrs = ("learn_sigma in_channels out_channels patch_size num_heads class_dropout_prob num_classes "
             "use_decoder mae_loss_coef pad_cls_token direct_cls_token ext_feature_dim use_encoder_feat "
             "extras decoder_extras").split()
    meta = {"precond": "EDMPrecond", "precond_kwargs": PRECOND_KWARGS, "tiny_model_type": dict(TINY),
            "dit_attributes": dict({k: getattr(dit, k) for k in attrs}, depth=len(dit.blocks)),
            "sigma_data": net.sigma_data, "sigma_min": net.sigma_min, "sigma_max": str(net.sigma_max),
            "decoder_replaced_by_official_classes": dict(
                DECODER, decoder_layer="DecoderLayer(64, 32)", final_layer="FinalLayer(32, 64, 2, 4)",
                mask_token=[1, 1, width], decoder_pos_embed=[1, grid * grid, width]),
            "seed": SEED, "param_std": PARAM_STD, "not_randomized": kept, "dtype": "float32"}
    return net.eval(), meta


def one_hot(labels: list[int | None]) -> torch.Tensor:
    """One-hot float32 rows as the official datasets give them; None = the null label (all zeros)."""
    return torch.stack([torch.eye(NUM_CLASSES)[c] if c is not None else torch.zeros(NUM_CLASSES)
                        for c in labels])


def stored_masks(masks: dict, prefix: str) -> dict:
    """An official mask_dict as fixture tensors: mask as bool (True = removed), ids_keep, ids_restore."""
    return {f"{prefix}.mask": masks["mask"] == 1, f"{prefix}.ids_keep": masks["ids_keep"],
            f"{prefix}.ids_restore": masks["ids_restore"]}


def make_network(official, net, out: Path, meta: dict) -> None:
    dit, get_mask = net.model, functools.partial(official.maskdit.get_mask, 3, 16, MASK_RATIO, device="cpu")
    torch.manual_seed(SEED)
    x, sigma, y = torch.randn(3, 4, 8, 8), torch.tensor([0.002, 1.0, 80.0]), one_hot([3, None, 7])
    c_noise = sigma.reshape(-1, 1, 1, 1).log().flatten() / 4  # as EDMPrecond.forward (maskdit.py:767)
    masks = get_mask()
    tensors = {**{f"state_dict.{k}": v for k, v in net.state_dict().items()}, "input.x": x,
               "input.noise_labels": c_noise, "input.y": y, **stored_masks(masks, "input")}
    with torch.no_grad():
        tensors["output.full"] = dit(x, c_noise, y)["x"]
        eval_masked = dit(x, c_noise, y, mask_ratio=MASK_RATIO, mask_dict=masks)["x"]
        dit.train()
        tensors["output.masked"] = dit(x, c_noise, y, mask_ratio=MASK_RATIO, mask_dict=masks)["x"]
        assert torch.equal(tensors["output.full"], dit(x, c_noise, y)["x"]), "train mode differs from eval"
        net.eval()

        psigma, py = torch.tensor([0.002, 0.7, 80.0]), one_hot([None, 2, 9])
        px, pmasks = torch.randn(3, 4, 8, 8) * psigma.reshape(-1, 1, 1, 1), get_mask()
        tensors.update({"precond.x": px, "precond.sigma": psigma, "precond.y": py,
                        "precond.out": net(px, psigma, py)["x"], **stored_masks(pmasks, "precond")})
        net.train()
        tensors["precond.masked_out"] = net(px, psigma, py, mask_ratio=MASK_RATIO, mask_dict=pmasks)["x"]
        net.eval()
        cfg_x, cfg_sigma, cfg_y = torch.randn(2, 4, 8, 8) * 0.7, torch.tensor([0.7]), one_hot([2, 9])
        tensors.update({"precond.cfg_x": cfg_x, "precond.cfg_sigma": cfg_sigma, "precond.cfg_y": cfg_y,
                        "precond.cfg_out": net(cfg_x, cfg_sigma, cfg_y, cfg_scale=CFG_SCALE)["x"]})
        try:
            net(cfg_x, psigma[1:], cfg_y, cfg_scale=CFG_SCALE)
            per_sample_sigma_with_cfg = "works"
        except RuntimeError as error:
            per_sample_sigma_with_cfg = f"RuntimeError: {str(error).splitlines()[0]}"
    meta.update({
        "output_full": "net.model(input.x, input.noise_labels, input.y)['x'], eval mode, mask_ratio 0",
        "output_masked": f"same in train mode, mask_ratio={MASK_RATIO}, mask_dict = official get_mask(3, 16, "
                         f"{MASK_RATIO}): input.mask (bool, True = removed), input.ids_keep/ids_restore",
        "eval_mode_with_mask_equals_full": bool(torch.equal(eval_masked, tensors["output.full"])),
        "noise_labels": "c_noise = ln(sigma)/4 for sigma [0.002, 1.0, 80.0], float32",
        "precond": f"precond.out = net(precond.x, precond.sigma, precond.y)['x'] (D), eval mode; masked_out: "
                   f"mask_ratio={MASK_RATIO}, mask_dict=precond.mask/ids, train mode; cfg_out = net(cfg_x, "
                   f"cfg_sigma, cfg_y, cfg_scale={CFG_SCALE}) via forward_with_cfg",
        "per_sample_sigma_with_cfg": per_sample_sigma_with_cfg})
    save_fixture(out / "maskdit.safetensors", tensors, meta)


class DDPLike:
    """What EDMLoss expects of ``net`` (train.py passes the DDP model): .module, .training, a call."""

    def __init__(self, module, outputs: list):
        self.module, self.outputs = module, outputs

    training = property(lambda self: self.module.training)
    model = property(lambda self: self.module.model)  # unwrap_model only unwraps real DDP/compiled modules

    def __call__(self, *args, **kwargs):
        self.outputs.append(self.module(*args, **kwargs))
        return self.outputs[-1]


@contextlib.contextmanager
def random_draws(official, replay: dict | None = None):
    """Record (or replay) torch.randn/randn_like in train_utils/loss.py and get_mask in models/maskdit.py."""
    real, real_get_mask = official.loss.torch, official.maskdit.get_mask
    log = {"randn": [], "randn_like": [], "get_mask": []}
    replay = {k: list(v) for k, v in (replay or {}).items()}

    def draw(kind, make):
        log[kind].append(replay[kind].pop(0) if replay.get(kind) else make())
        return log[kind][-1].clone() if isinstance(log[kind][-1], torch.Tensor) else dict(log[kind][-1])

    class TorchProxy:
        def __getattr__(self, attr):
            return getattr(real, attr)

        randn = staticmethod(lambda *a, **k: draw("randn", lambda: real.randn(*a, **k)))
        randn_like = staticmethod(lambda *a, **k: draw("randn_like", lambda: real.randn_like(*a, **k)))

    official.loss.torch = TorchProxy()
    official.maskdit.get_mask = lambda *a, **k: draw("get_mask", lambda: real_get_mask(*a, **k))
    try:
        yield log
    finally:
        official.loss.torch, official.maskdit.get_mask = real, real_get_mask


def make_loss_sampler(official, net, out: Path, meta: dict) -> None:
    torch.manual_seed(SEED)
    loss_fn = official.loss.Losses["edm"]()  # train.py:182: defaults P_mean=-1.2, P_std=1.2, sigma_data=0.5
    assert loss_fn.sigma_data == net.sigma_data == 0.5
    images, labels = torch.randn(3, 4, 8, 8), one_hot([4, None, 8])
    net.train()
    with torch.no_grad():
        outputs = []
        with random_draws(official) as log:
            masked = loss_fn(DDPLike(net, outputs), images, labels, mask_ratio=MASK_RATIO,
                             mae_loss_coef=MAE_COEF)
        assert [len(v) for v in log.values()] == [1, 1, 1], {k: len(v) for k, v in log.items()}
        (rnd_normal,), (noise,), (masks,) = log.values()
        with random_draws(official, log):
            denoise = loss_fn(DDPLike(net, []), images, labels, mask_ratio=MASK_RATIO, mae_loss_coef=0)
        with random_draws(official, log) as log_full:
            full = loss_fn(DDPLike(net, []), images, labels, mask_ratio=0, mae_loss_coef=MAE_COEF)
        assert not log_full["get_mask"]
        sigma = (rnd_normal * loss_fn.P_std + loss_fn.P_mean).exp()
        mae = official.loss.mae_loss(net, images + noise * sigma, outputs[0]["x"], masks["mask"])
    net.eval()
    tensors = {"loss.images": images, "loss.labels": labels, "loss.rnd_normal": rnd_normal,
               "loss.noise": noise, "loss.sigma": sigma.flatten(), **stored_masks(masks, "loss"),
               "loss.D": outputs[0]["x"], "loss.masked": masked, "loss.full": full, "loss.denoise": denoise,
               "loss.mae": mae}
    meta["loss"] = {
        "class": "EDMLoss()", "P_mean": loss_fn.P_mean, "P_std": loss_fn.P_std, "sigma_data": 0.5,
        "mask_ratio": MASK_RATIO, "mae_loss_coef": MAE_COEF, "mode": "train", "net": "DDPLike(EDMPrecond)",
        "draws": "rnd_normal = torch.randn([3,1,1,1]); noise = torch.randn_like(images) (n = noise * sigma); "
                 "mask = get_mask(3, 16, 0.5) inside the model; loss.sigma = exp(rnd_normal*P_std+P_mean)",
        "calls": "masked = loss_fn(net, images, labels, mask_ratio=0.5, mae_loss_coef=0.1); denoise: the "
                 "same draws, mae_loss_coef=0; full: same rnd_normal/noise, mask_ratio=0; mae = mae_loss("
                 "net, images + noise*sigma, loss.D, mask) (norm_pix_loss=True); D = model_out['x'] (masked)",
        "masked_equals_denoise_plus_coef_mae": bool(torch.equal(masked, denoise + MAE_COEF * mae))}

    latents, labels = torch.randn(2, 4, 8, 8), one_hot([1, 6])
    sigmas, noise = [], []

    def round_sigma(sigma):  # official EDMPrecond.round_sigma, recording the sigmas it is asked for
        sigmas.append(torch.as_tensor(sigma).clone())
        return torch.as_tensor(sigma)

    def randn_like(x):  # float32 draws, so that storing them as float32 replays them exactly
        noise.append(torch.randn(x.shape, dtype=torch.float32))
        return noise[-1].to(x.dtype)

    net.round_sigma = round_sigma
    tensors.update({"sampler.latents": latents, "sampler.labels": labels})
    runs = {"unguided": dict(cfg_scale=None), "guided": dict(cfg_scale=CFG_SCALE),
            "churn": dict(cfg_scale=None, randn_like=randn_like, **CHURN)}
    with torch.no_grad():
        for name, kwargs in runs.items():
            sigmas.clear()
            out_x = official.sample.edm_sampler(net, latents, labels, **SAMPLER, **kwargs)
            tensors[f"sampler.{name}.out"] = out_x
    del net.round_sigma
    tensors.update({"sampler.t_steps": torch.cat([sigmas[0], torch.zeros(1, dtype=torch.float64)]),
                    "sampler.churn.t_hat": torch.stack(sigmas[1:]),
                    "sampler.churn.step_noise": torch.stack(noise)})
    meta["sampler"] = {
        "function": "sample.edm_sampler", "settings": SAMPLER, "churn_settings": CHURN,
        "cfg_scale": CFG_SCALE,
        "call": "edm_sampler(net, sampler.latents, sampler.labels, cfg_scale=None (unguided, churn) or 1.5 "
                "(guided), num_steps=6, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0 (defaults S_min=0, "
                "S_max=inf, S_noise=1); churn: randn_like=recorder, S_churn=40, S_min=0.05, S_max=50, "
                "S_noise=1.003)", "net": "EDMPrecond, eval mode; cfg_scale -> model.forward_with_cfg",
        "outputs": "float64 as edm_sampler returns them (sample.py then casts to float32); t_steps: float64, "
                   "round_sigma's first call plus the final 0; churn.t_hat: float64 t_hat of each step",
        "step_noise": "randn_like draws in call order (one per step, also where gamma = 0): float32 "
                      "torch.randn(shape) cast to float64"}
    save_fixture(out / "maskdit_loss_sampler.safetensors", tensors, meta)


def make_param_counts(maskdit, path: Path) -> None:
    """Parameter counts of the official XL/2 MaskDiT (EDMPrecond as train.py builds it), meta device."""
    result = {"requires_grad": {}, "settings": {}}
    for label, size in [("MaskDiT-XL/2-256", 32), ("MaskDiT-XL/2-512", 64)]:
        kwargs = dict(img_resolution=size, img_channels=4, num_classes=1000, model_type="DiT-XL/2",
                      use_decoder=True, mae_loss_coef=0.1, pad_cls_token=False)
        with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
            net = maskdit.EDMPrecond(**kwargs)
        result[label] = sum(p.numel() for p in net.parameters())
        result["requires_grad"][label] = sum(p.numel() for p in net.parameters() if p.requires_grad)
        result["settings"][label] = dict(kwargs, constructor="EDMPrecond")
    result.update(commit=MASKDIT_COMMIT, note="sum(p.numel() for p in net.parameters()) of EDMPrecond "
                  "(.model: the DiT with the width-512 depth-8 decoder); requires_grad excludes pos_embed "
                  "and decoder_pos_embed; no buffers. 512 differs only by its larger frozen pos embeds.")
    text = json.dumps(result, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--maskdit", type=Path, required=True, help="MaskDiT work tree at the commit")
    default_out = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "official"
    parser.add_argument("--out", type=Path, default=default_out)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    import timm  # needed by the official model only
    from timm.layers import set_fused_attn

    set_fused_attn(False)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"name": "maskdit", "repo": "Anima-Lab/MaskDiT", "commit": MASKDIT_COMMIT,
            "commit_verified": check_checkout(args.maskdit, MASKDIT_COMMIT),
            "torch_version": torch.__version__, "timm_version": timm.__version__, "timm_fused_attn": False}
    official = import_official(args.maskdit)
    net, model_meta = build_tiny(official.maskdit)
    meta.update(model_meta)
    make_network(official, net, args.out, dict(meta))
    make_loss_sampler(official, net, args.out, dict(meta, weights="maskdit.safetensors state_dict.*"))
    make_param_counts(official.maskdit, args.out / "maskdit_param_counts.json")


if __name__ == "__main__":
    main()
