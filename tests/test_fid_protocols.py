"""The papers' FID protocols: the pytorch-fid mode (MaskDM's evaluation) against the pytorch-fid package
itself, and the refusal of a reference made in another mode.

pytorch-fid's `InceptionV3` has no construction path without a download (`use_fid_inception=True`
loads `pt_inception-2015-12-05-6726825d.pth` through torch hub, `False` loads torchvision's
weights), except a file already in the hub cache. So the package is run here in three ways: its
preprocessing through a hollow `InceptionV3` (its own forward, no blocks), and its whole FID with
either the genuine weights file, when this machine has it, or the weights of mdt's installed
Inception written into the package's layout in a temporary hub cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as TF
from helpers import cli_refusal
from PIL import Image
from pytorch_fid import fid_score
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from sample_helpers import write_stand_in_inception
from torch import nn
from typer.testing import CliRunner

from mdt.cli import app
from mdt.data.images import center_crop_adm
from mdt.eval import network
from mdt.eval.features import FileImages, extract_features
from mdt.eval.fid import FeatureOptions, sample_files
from mdt.eval.reference import EvalOptions, load_reference
from mdt.eval.stats import FeatureStats

SIZE = 64
WEIGHTS_FILE = FID_WEIGHTS_URL.rsplit("/", 1)[1]  # pt_inception-2015-12-05-6726825d.pth


def _crop_real_images(sample: Path, folder: Path, picks: slice) -> Path:
    """ImageNet JPEGs, ADM-center-cropped to SIZE and saved as PNG, as `mdt sample` writes samples."""
    folder.mkdir(parents=True)
    jpegs = sorted((sample / "train").glob("*/*.JPEG"))[picks]
    for i, path in enumerate(jpegs):
        with Image.open(path) as img:
            center_crop_adm(img.convert("RGB"), SIZE).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def real(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("protocols")
    return {"samples": _crop_real_images(imagenet_sample, root / "samples", slice(0, 800, 160)),
            "refs": _crop_real_images(imagenet_sample, root / "refs", slice(7, 800, 160)),
            "stand_in": write_stand_in_inception(root / "stand_in.pt")}


def _package_listing(folder: Path) -> list[Path]:
    """The files pytorch-fid's compute_statistics_of_path reads from a folder."""
    return sorted(f for ext in fid_score.IMAGE_EXTENSIONS for f in folder.glob(f"*.{ext}"))


def _hollow_inception() -> InceptionV3:
    """The package's InceptionV3 with its resize and normalisation but no network blocks (no weights)."""
    hollow = InceptionV3.__new__(InceptionV3)
    nn.Module.__init__(hollow)
    hollow.resize_input, hollow.normalize_input = True, True
    hollow.output_blocks, hollow.last_needed_block = [0], 0
    hollow.blocks = nn.ModuleList([nn.Identity()])
    return hollow


class _Recorder:
    """Stands where the Inception sits in mdt's feature loop and keeps what it is fed."""

    has_spatial = has_logits = False

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append(x.clone())
        return {"pool": torch.zeros(len(x), 1)}


def _inception_input(files: list[Path], mode: str) -> torch.Tensor:
    recorder = _Recorder()
    extract_features(FileImages(files), recorder, mode, batch_size=2, num_workers=0, verbose=False)
    return torch.cat(recorder.inputs)


def test_pytorch_fid_mode_feeds_inception_exactly_the_packages_tensor(real) -> None:
    files = _package_listing(real["samples"])
    assert files == sample_files(real["samples"])
    assert len(files) == 5
    loader = torch.utils.data.DataLoader(fid_score.ImagePathDataset(files, transforms=TF.ToTensor()),
                                         batch_size=len(files))
    (package,) = _hollow_inception()(next(iter(loader)))
    ours = _inception_input(files, "pytorch-fid")
    assert ours.shape == package.shape == (5, 3, 299, 299)
    assert ours.dtype == package.dtype == torch.float32
    assert torch.equal(ours, package)  # bit for bit
    assert package.min() >= -1
    assert package.max() <= 1
    for other in ("clean", "adm"):  # the other modes' inputs are measurably different
        assert (_inception_input(files, other) - package).abs().mean() > 1e-3


# pytorch-fid's (torchvision's) names of the 94 conv + batch-norm units -> the TF graph's, as mdt's port names them.
_A = {"branch1x1": "conv", "branch5x5_1": "tower.conv", "branch5x5_2": "tower.conv_1", "branch3x3dbl_1": "tower_1.conv",
      "branch3x3dbl_2": "tower_1.conv_1", "branch3x3dbl_3": "tower_1.conv_2", "branch_pool": "tower_2.conv"}
_B = {"branch3x3": "conv", "branch3x3dbl_1": "tower.conv", "branch3x3dbl_2": "tower.conv_1",
      "branch3x3dbl_3": "tower.conv_2"}
_C = {"branch1x1": "conv", "branch7x7_1": "tower.conv", "branch7x7_2": "tower.conv_1", "branch7x7_3": "tower.conv_2",
      **{f"branch7x7dbl_{i + 1}": "tower_1.conv" + (f"_{i}" if i else "") for i in range(5)},
      "branch_pool": "tower_2.conv"}
_D = {"branch3x3_1": "tower.conv", "branch3x3_2": "tower.conv_1",
      **{f"branch7x7x3_{i + 1}": "tower_1.conv" + (f"_{i}" if i else "") for i in range(4)}}
_E = {"branch1x1": "conv", "branch3x3_1": "tower_conv", "branch3x3_2a": "tower_mixed_conv",
      "branch3x3_2b": "tower_mixed_conv_1", "branch3x3dbl_1": "tower_1_conv", "branch3x3dbl_2": "tower_1_conv_1",
      "branch3x3dbl_3a": "tower_1_mixed_conv", "branch3x3dbl_3b": "tower_1_mixed_conv_1", "branch_pool": "tower_2_conv"}
_MIXED = [("Mixed_5b", "mixed", _A), ("Mixed_5c", "mixed_1", _A), ("Mixed_5d", "mixed_2", _A), ("Mixed_6a", "mixed_3", _B),
          *((f"Mixed_6{c}", f"mixed_{i}", _C) for i, c in enumerate("bcde", start=4)), ("Mixed_7a", "mixed_8", _D),
          ("Mixed_7b", "mixed_9", _E), ("Mixed_7c", "mixed_10", _E)]


def _write_package_weights(path: Path) -> None:
    """mdt's installed Inception in pytorch-fid's state_dict layout (the TF graph's batch norm has no scale)."""
    units = {"Conv2d_1a_3x3": "conv", "Conv2d_2a_3x3": "conv_1", "Conv2d_2b_3x3": "conv_2", "Conv2d_3b_1x1": "conv_3",
             "Conv2d_4a_3x3": "conv_4"}
    units |= {f"{ours}.{branch}": f"{theirs}.{tf}" for ours, theirs, table in _MIXED for branch, tf in table.items()}
    port = network.FeatureNetwork(network.locate_inception(None), torch.device("cpu")).layers.state_dict()
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}  # unused by the FID blocks
    for name, tf in units.items():
        state |= {f"{name}.conv.weight": port[f"{tf}.weight"], f"{name}.bn.weight": torch.ones_like(port[f"{tf}.beta"]),
                  f"{name}.bn.bias": port[f"{tf}.beta"], f"{name}.bn.running_mean": port[f"{tf}.mean"],
                  f"{name}.bn.running_var": port[f"{tf}.var"]}
    assert len(units) == 94
    assert 4 * len(units) == len(port)
    path.parent.mkdir(parents=True)
    torch.save(state, path)


def _mdt_fid(real, tmp_path: Path) -> tuple[float, FeatureStats]:
    ref, out = tmp_path / "ref.npz", tmp_path / "metrics.json"
    common = ["--mode", "pytorch-fid", "--workers", "0", "--batch-size", "5", "--device", "cpu"]
    made = CliRunner().invoke(app, ["fid-ref", str(real["refs"]), "--out", str(ref), "--resolution", str(SIZE), *common])
    assert made.exit_code == 0, made.output
    run = CliRunner().invoke(app, ["fid", "--samples", str(real["samples"]), "--ref", str(ref), "--out", str(out),
                                   *common])
    assert run.exit_code == 0, run.output
    metrics = json.loads(out.read_text())
    assert metrics["mode"] == "pytorch-fid"
    assert metrics["num_samples"] == 5
    assert "[pytorch-fid] FID" in run.output
    return metrics["fid"], FeatureStats.load(ref)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["pytorch-fid's own file", "mdt's Inception in pytorch-fid's layout"])
def test_pytorch_fid_mode_gives_the_packages_fid(real, weights: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(network, "clean_fid_cache_path", lambda: tmp_path / "absent.pt")  # the pinned file
    if weights == "pytorch-fid's own file":
        if not (Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE).is_file():
            pytest.skip(f"{WEIGHTS_FILE} is not in the torch hub cache ({torch.hub.get_dir()}/checkpoints) and cannot "
                        "be downloaded here")
    else:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
        _write_package_weights(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE)
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()  # reads the cached file, no download
    mu1, sigma1 = fid_score.compute_statistics_of_path(str(real["samples"]), model, 5, 2048, "cpu", 0)
    mu2, sigma2 = fid_score.compute_statistics_of_path(str(real["refs"]), model, 5, 2048, "cpu", 0)
    package_fid = float(fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2))
    ours, ref = _mdt_fid(real, tmp_path)
    np.testing.assert_allclose(ref.mu, mu2, atol=1e-4)
    assert package_fid > 50
    assert ours == pytest.approx(package_fid, rel=1e-4)


def _invoke_fid(samples: Path, ref: Path, mode: str, stand_in: Path, *extra: str):
    return CliRunner().invoke(app, ["fid", "--samples", str(samples), "--ref", str(ref), "--mode", mode, "--inception",
                                    str(stand_in), "--workers", "0", "--device", "cpu", *extra])


def _refused(result, *words: str) -> str:
    message = cli_refusal(result)
    assert all(w in message for w in words), message
    assert len(message.rstrip(".").split(". ")) == 1, message  # one sentence
    return message


def test_a_reference_made_in_another_mode_is_refused_with_the_fix(real, tmp_path: Path) -> None:
    stand_in = real["stand_in"]
    ref = tmp_path / "pt.npz"
    made = CliRunner().invoke(app, ["fid-ref", str(real["refs"]), "--out", str(ref), "--resolution", str(SIZE), "--mode",
                                    "pytorch-fid", "--inception", str(stand_in), "--workers", "0", "--device", "cpu"])
    assert made.exit_code == 0, made.output
    assert FeatureStats.load(ref).meta["mode"] == "pytorch-fid"
    for mode in ("clean", "adm"):
        _refused(_invoke_fid(real["samples"], ref, mode, stand_in, "--out", str(tmp_path / "never.json")),
                 f"--ref {ref} was computed in pytorch-fid mode but --mode is {mode}", "pass --mode pytorch-fid",
                 f"`mdt fid-ref --mode {mode}`")
    assert not (tmp_path / "never.json").exists()
    ok = _invoke_fid(real["samples"], ref, "pytorch-fid", stand_in, "--out", str(tmp_path / "m.json"))
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "m.json").read_text())["mode"] == "pytorch-fid"
    _refused(_invoke_fid(real["samples"], ref, "pytorch_fid", stand_in), "--mode 'pytorch_fid' is unknown",
             "clean", "adm", "pytorch-fid")


def test_an_adm_batch_is_an_adm_mode_reference(real, tmp_path: Path, monkeypatch) -> None:
    """ADM's batches record no mode: their mu/sigma are adm-mode; other modes recompute from arr_0 or refuse.
    (An ADM batch needs the real Inception-v3; only the arr_0 check below runs it, on 2 x 5 images.)"""
    monkeypatch.setattr(network, "clean_fid_cache_path", lambda: tmp_path / "absent.pt")  # the pinned file
    installed = network.installed_inception_path()
    stats_only, with_images = tmp_path / "VIRTUAL_stats.npz", tmp_path / "VIRTUAL_images.npz"
    np.savez(stats_only, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(8), sigma_s=np.eye(8))
    arr_0 = np.stack([np.asarray(Image.open(p)) for p in sample_files(real["refs"])])
    np.savez(with_images, arr_0=arr_0, mu=np.zeros(2048), sigma=np.eye(2048))
    for mode in ("clean", "pytorch-fid"):
        _refused(_invoke_fid(real["samples"], stats_only, mode, installed, "--out", str(tmp_path / "never.json")),
                 f"--ref {stats_only} was computed in adm mode but --mode is {mode}", "pass --mode adm", "arr_0")
    assert not (tmp_path / "never.json").exists()
    net = FeatureOptions(device="cpu", num_workers=0, verbose=False).network()
    adm = load_reference(stats_only, SIZE, net, EvalOptions("adm", verbose=False), tmp_path / "cache")
    assert adm.kind == "adm-reference-batch"
    assert adm.stats.meta["mode"] == "adm"
    assert not adm.stats.mu.any()
    # In pytorch-fid mode the batch's arr_0 (here the reference folder's images) gives the statistics.
    opts = EvalOptions("pytorch-fid", batch_size=5, num_workers=0, verbose=False)
    batch = load_reference(with_images, SIZE, net, opts, tmp_path / "cache")
    folder = load_reference(real["refs"], SIZE, net, opts, tmp_path / "cache")
    assert batch.stats.meta["mode"] == "pytorch-fid"
    assert batch.stats.mu.any()
    np.testing.assert_array_equal(batch.stats.feats, folder.stats.feats)


def test_a_format_1_reference_stays_usable_in_clean_mode_only(real, tmp_path: Path) -> None:
    """Format 1 (no `version`) was always clean mode with the same preprocessing; its network id was SHA-256[:16]."""
    stand_in = real["stand_in"]
    ref = tmp_path / "v2.npz"
    made = CliRunner().invoke(app, ["fid-ref", str(real["refs"]), "--out", str(ref), "--resolution", str(SIZE),
                                    "--inception", str(stand_in), "--workers", "0", "--device", "cpu"])
    assert made.exit_code == 0, made.output
    current = FeatureStats.load(ref)
    meta = {k: current.meta[k] for k in ("format", "mode", "resolution", "num_images", "source")}
    legacy = tmp_path / "v1.npz"
    FeatureStats(current.mu, current.sigma, current.feats,
                 {**meta, "feature_network": network.legacy_network_id(stand_in)}).save(legacy)
    runs = {}
    for name, path in (("v2", ref), ("v1", legacy)):
        out = tmp_path / f"{name}.json"
        result = _invoke_fid(real["samples"], path, "clean", stand_in, "--out", str(out))
        assert result.exit_code == 0, result.output
        runs[name] = json.loads(out.read_text())
    assert runs["v1"]["fid"] == pytest.approx(runs["v2"]["fid"], rel=1e-12)
    assert runs["v1"]["sfid"] is None
    _refused(_invoke_fid(real["samples"], legacy, "adm", stand_in), "was computed in clean mode but --mode is adm")
    other = tmp_path / "v1_other_net.npz"
    FeatureStats(current.mu, current.sigma, None, {**meta, "feature_network": "0123456789abcdef"}).save(other)
    _refused(_invoke_fid(real["samples"], other, "clean", stand_in), "another feature network")
