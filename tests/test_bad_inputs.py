"""Every file a user hands a command, cut short, emptied or of another format: one sentence naming the file
and the fix, exit status 2, no traceback, nothing written (issue 24). In process, through typer's CliRunner."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from golden_helpers import load_fixture, official_state_dict
from helpers import cli_refusal
from PIL import Image
from safetensors.torch import save_file
from sample_helpers import CLASS_NAMES, make_export, write_stand_in_inception
from typer.testing import CliRunner

from mdt.cli import app
from mdt.diffusion.schedule import ScheduleConfig
from mdt.eval.classifier import make_classifier
from mdt.fileio import write_json
from mdt.locking import LOCK_NAME
from mdt.models import create_model, save_pretrained

# Not UTF-8, not a zip, a tar, a pickle, JSON, YAML or a safetensors header: a file of some other format.
FOREIGN = bytes(range(256))[::-1] * 2
KINDS = ("truncated", "empty", "foreign")


def damage(path: Path, kind: str) -> Path:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "foreign": FOREIGN}[kind])
    return path


def invoke(args: list) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def refused(args: list, damaged: Path, out: Path) -> str:
    """Run the command; it must refuse in one sentence naming `damaged` and leave `out` unwritten."""
    message = cli_refusal(invoke(args))
    assert str(damaged) in message, message
    assert len(message.rstrip(".").split(". ")) == 1, message  # one sentence
    assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())  # no staging folder
    return message


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory, tiny_vae_dir: Path, pixel_latents: Path) -> dict[str, Path]:
    """Good inputs of every kind; each test copies what it damages."""
    root = tmp_path_factory.mktemp("good")
    export = make_export(root / "export", vae_spec="pixel", latent_shape=(3, 8, 8), resolution=8, kind="pixel",
                         scaling_factor=1.0)
    samples = root / "samples"
    made = invoke(["sample", "--ckpt", export, "--out", samples, "--num-samples", "6", "--steps", "2",
                   "--batch-size", "6", "--no-progress"])
    assert made.exit_code == 0, made.output
    real = root / "real"
    for name in CLASS_NAMES:
        (real / name).mkdir(parents=True)
        Image.new("RGB", (8, 8), "red").save(real / name / "0.png")
    classifier = root / "classifier"
    classifier.mkdir()
    save_file(make_classifier(len(CLASS_NAMES)).state_dict(), str(classifier / "classifier.safetensors"))
    write_json(classifier / "classifier.json", {"class_names": CLASS_NAMES, "image_size": 8, "val_accuracy": 1.0})
    run = root / "run"
    (run / "metrics.jsonl").parent.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5, "wall_time_s": 1.0}\n')
    write_json(run / "metrics.json", {"steps": 1})
    return {"export": export, "samples": samples, "real": real, "classifier": classifier, "run": run,
            "latent_export": make_export(root / "latent_export", vae_spec=str(tiny_vae_dir)),
            "init": _init_export(root / "init", pixel_latents), "vae": tiny_vae_dir, "latents": pixel_latents,
            "net": write_stand_in_inception(root / "net.pt"), "dit": official_state_dict(load_fixture("dit")[0])}


def _init_export(directory: Path, latents: Path) -> Path:
    """An export that fits the pixel latents (3x8x8, 4 classes), as `mdt train --init-from` takes."""
    save_pretrained(create_model("DiT-T/2", input_size=8, in_channels=3, num_classes=4), directory)
    write_json(directory / "diffusion.json", ScheduleConfig().to_dict())
    shutil.copy(latents / "manifest.json", directory / "data_manifest.json")
    return directory


def copy(source: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(source, tmp / source.name) if source.is_dir() else shutil.copy(source, tmp))


# Each builder copies the good input into `tmp` and returns (command line, the file to damage, what must not
# be written).
Builder = Callable[[dict, Path], tuple[list, Path, Path]]
SAMPLE = ["--num-samples", "1", "--steps", "1", "--no-progress"]


def fid_options(net: Path, tmp: Path) -> list:
    """The stand-in network, in this process, with the reference cache in the test's folder."""
    return ["--inception", net, "--workers", "0", "--device", "cpu", "--cache-dir", tmp / "cache"]


def _import_file(suffix: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        source = tmp / f"ckpt{suffix}"
        if suffix == ".pt":
            torch.save(fx["dit"], source)
        else:
            save_file(fx["dit"], str(source))
        return ["import", source, tmp / "out", "--model", "DiT", "--set", "num_heads=4"], source, tmp / "out"
    return build


def _import_diffusers(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
    (tmp / "dit").mkdir()
    write_json(tmp / "dit" / "config.json", {"_class_name": "DiTTransformer2DModel"})
    return ["import", tmp / "dit", tmp / "out", "--model", "DiT"], tmp / "dit" / "config.json", tmp / "out"


def _sample(name: str, run_folder: bool = False) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        export = copy(fx["export"], tmp)
        ckpt = export
        if run_folder:  # a training run folder: RUN/ema is the export
            ckpt = tmp / "RUN"
            ckpt.mkdir()
            export = export.rename(ckpt / "ema")
        return ["sample", "--ckpt", ckpt, "--out", tmp / "out", *SAMPLE], export / name, tmp / "out"
    return build


def _export(name: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        export = copy(fx["latent_export"], tmp)
        return ["export", export, tmp / "out", "--vae", fx["vae"]], export / name, tmp / "out"
    return build


def _train(what: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        data = fx["latents"]
        args = ["--out", tmp / "out", "--model", "DiT-T/2", "--steps", "1", "--micro-batch", "2", "--num-workers", "0"]
        if what == "manifest.json":
            data = copy(data, tmp)
            damaged = data / what
        else:
            damaged = copy(fx["init"], tmp) / what
            args += ["--init-from", damaged.parent]
        return ["train", "--data", data, *args], damaged, tmp / "out"
    return build


def _data(command: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        data = copy(fx["latents"], tmp)
        return ["data", command, data], data / "manifest.json", tmp / "out"
    return build


def _fid(side: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        samples, ref, net = fx["samples"], fx["samples"], fx["net"]
        if side == "ref.npz":
            ref = copy(samples / "samples.npz", tmp)
            damaged = ref
        elif side == "samples.npz":
            samples = damaged = copy(samples / "samples.npz", tmp)
        elif side == "ref png":
            ref = copy(ref, tmp)
            damaged = ref / "000001.png"
        elif side == "sample png":
            samples = copy(samples, tmp)
            damaged = samples / "000001.png"
        else:
            net = damaged = copy(net, tmp)
        return (["fid", "--samples", samples, "--ref", ref, *fid_options(net, tmp), "--out", tmp / "m.json"], damaged,
                tmp / "m.json")
    return build


def _fid_ref(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
    images = copy(fx["samples"], tmp)
    return (["fid-ref", images, "--out", tmp / "r.npz", "--resolution", "8", *fid_options(fx["net"], tmp)[:-2]],
            images / "000002.png", tmp / "r.npz")


def _classifier(name: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        classifier, samples = fx["classifier"], fx["samples"]
        if name == "samples.npz":
            samples = copy(samples, tmp)
            damaged = samples / name
        else:
            damaged = copy(classifier, tmp) / name
            classifier = damaged.parent
        return (["classifier", "score", "--samples", samples, "--classifier", classifier, "--out", tmp / "m.json"],
                damaged, tmp / "m.json")
    return build


def _side_by_side(name: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        real, samples = fx["real"], fx["samples"]
        if name == "real png":
            real = copy(real, tmp)
            damaged = real / CLASS_NAMES[int(np.load(samples / "samples.npz")["arr_1"][0])] / "0.png"
        else:
            samples = copy(samples, tmp)
            damaged = samples / name
        return ["side-by-side", "--real", real, "--samples", samples, "--out", tmp / "o.png"], damaged, tmp / "o.png"
    return build


def _plot(name: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        run = copy(fx["run"], tmp)
        return ["plot", run, "--out", tmp / "loss.png", "--summary", tmp / "s.json"], run / name, tmp / "loss.png"
    return build


def _vae(command: str, layout: str) -> Builder:
    def build(fx: dict, tmp: Path) -> tuple[list, Path, Path]:
        vae = copy(fx["vae"], tmp)
        damaged = vae / "diffusion_pytorch_model.safetensors"
        if layout == "file":  # a single .safetensors file with its config.json beside it
            vae = damaged
        if command == "sample":
            return ["sample", "--ckpt", fx["latent_export"], "--vae", vae, "--out", tmp / "out", *SAMPLE], damaged, \
                tmp / "out"
        return (["encode", fx["real"], tmp / "out", "--vae", vae, "--resolution", "64", "--workers", "0",
                 "--no-progress"], damaged, tmp / "out")
    return build


BUILDERS: dict[str, Builder] = {
    "import .pt": _import_file(".pt"),
    "import .safetensors": _import_file(".safetensors"),
    "import diffusers config.json": _import_diffusers,
    **{f"sample {name}": _sample(name) for name in
       ("model.safetensors", "model_config.json", "diffusion.json", "data_manifest.json")},
    "sample RUN/ema/model.safetensors": _sample("model.safetensors", run_folder=True),
    "export model.safetensors": _export("model.safetensors"),
    "export diffusion.json": _export("diffusion.json"),
    "train --data manifest.json": _train("manifest.json"),
    "train --init-from model_config.json": _train("model_config.json"),
    "data info manifest.json": _data("info"),
    "data verify manifest.json": _data("verify"),
    **{f"fid {side}": _fid(side) for side in ("ref.npz", "samples.npz", "ref png", "sample png", "inception")},
    "fid-ref png": _fid_ref,
    **{f"classifier score {name}": _classifier(name) for name in
       ("classifier.json", "classifier.safetensors", "samples.npz")},
    **{f"side-by-side {name}": _side_by_side(name) for name in ("samples.npz", "sample_config.json", "real png")},
    "plot --summary RUN/metrics.json": _plot("metrics.json"),
    "sample --vae folder": _vae("sample", "folder"),
    "encode --vae folder": _vae("encode", "folder"),
    "encode --vae file": _vae("encode", "file"),
}
# mdt/train/run_dir.py reads --init-from's weights and data manifest through mdt.fileio too.
RUN_DIR_READS = {"train --init-from model.safetensors": _train("model.safetensors"),
                 "train --init-from data_manifest.json": _train("data_manifest.json")}


@pytest.fixture
def no_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mdt train` refuses these before any collective; a real process group would outlive the test here."""
    import mdt.train.loop

    monkeypatch.setattr(mdt.train.loop, "init_process_group", lambda: None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(BUILDERS))
def test_a_damaged_input_is_one_sentence_naming_it(fx, tmp_path: Path, no_process_group, case: str,
                                                    kind: str) -> None:
    args, damaged, out = BUILDERS[case](fx, tmp_path)
    refused(args, damage(damaged, kind), out)


@pytest.mark.parametrize("case", list(RUN_DIR_READS))
def test_a_damaged_init_from_export_is_one_sentence(fx, tmp_path: Path, no_process_group, case: str) -> None:
    args, damaged, out = RUN_DIR_READS[case](fx, tmp_path)
    refused(args, damage(damaged, "truncated"), out)


@pytest.mark.parametrize("content", ["", "sample: [unclosed\n", "- a list\n", FOREIGN], ids=["empty", "not-yaml",
                                                                                             "a-list", "foreign"])
@pytest.mark.parametrize("command", ["recipe", "sample", "train"])
def test_a_damaged_recipe_is_one_sentence(fx, tmp_path: Path, no_process_group, command: str, content) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(content.encode() if isinstance(content, str) else content)
    args = {"recipe": ["recipe", recipe],
            "sample": ["sample", "--config", recipe, "--ckpt", fx["export"], "--out", tmp_path / "out", *SAMPLE],
            "train": ["train", "--config", recipe, "--data", fx["latents"], "--out", tmp_path / "out"]}[command]
    refused(args, recipe, tmp_path / "out")


def test_sampling_into_a_folder_with_a_damaged_record_is_one_sentence(fx, tmp_path: Path) -> None:
    out = copy(fx["samples"], tmp_path)
    record = damage(out / "sample_config.json", "truncated")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME}
    message = cli_refusal(invoke(["sample", "--ckpt", fx["export"], "--out", out, *SAMPLE]))
    assert str(record) in message
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_NAME} == before


def test_a_text_file_or_random_bytes_to_import_is_not_a_checkpoint_and_gets_no_trust_pickle_hint(
        tmp_path: Path) -> None:
    text = tmp_path / "passwd"
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(100))
    for source in (text, junk):
        message = refused(["import", source, tmp_path / "out", "--model", "DiT-XL/2"], source, tmp_path / "out")
        assert "not a readable PyTorch checkpoint" in message
        assert ".safetensors" in message  # says what it reads
        assert "--trust-pickle" not in message


@pytest.mark.parametrize("kind", ["foreign", "not-json"])
def test_a_damaged_training_log_is_one_sentence(fx, tmp_path: Path, kind: str) -> None:
    run = copy(fx["run"], tmp_path)
    log = run / "metrics.jsonl"
    log.write_bytes(FOREIGN if kind == "foreign" else b'{"step": 1, "loss": 0.5}\nnot json\n')
    refused(["plot", run, "--out", tmp_path / "loss.png"], log, tmp_path / "loss.png")


def test_a_damaged_metrics_file_is_refused_before_fid_computes(fx, tmp_path: Path) -> None:
    metrics = tmp_path / "m.json"
    metrics.write_bytes(FOREIGN)
    message = cli_refusal(invoke(["fid", "--samples", fx["samples"], "--ref", fx["samples"],
                                  *fid_options(fx["net"], tmp_path), "--out", metrics]))
    assert str(metrics) in message
    assert metrics.read_bytes() == FOREIGN


def test_data_verify_reports_a_damaged_shard_by_name(fx, tmp_path: Path) -> None:
    """A damaged shard is what `mdt data verify` looks for: a report line naming it and exit status 1."""
    data = copy(fx["latents"], tmp_path)
    shard = sorted(data.glob("*.tar"))[0]
    damage(shard, "truncated")
    result = invoke(["data", "verify", data, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert f"bad: {shard.name}" in result.stderr
    assert "Traceback" not in result.output


def test_two_copies_of_one_sample_folder_have_fid_zero(fx, tmp_path: Path) -> None:
    """The reference side reads a folder of `mdt sample` as the samples side does: its PNGs, not its grid.png."""
    samples, ref = copy(fx["samples"], tmp_path / "a"), copy(fx["samples"], tmp_path / "b")
    result = invoke(["fid", "--samples", samples, "--ref", ref, *fid_options(fx["net"], tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((samples / "metrics.json").read_text())
    assert metrics["num_reference"] == metrics["num_samples"] == 6
    assert abs(metrics["fid"]) < 1e-4


@pytest.mark.parametrize("content", ["", "steps: [unclosed\n", FOREIGN], ids=["empty", "not-yaml", "foreign"])
def test_resuming_a_run_whose_settings_file_is_damaged_is_one_sentence(fx, tmp_path: Path, no_process_group,
                                                                      content) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "LATEST.json").write_text('{"tag": "step_00000001", "step": 1, "world_size": 1}')
    (run / "config.yaml").write_bytes(content.encode() if isinstance(content, str) else content)
    message = cli_refusal(invoke(["train", "--resume", run]))
    assert str(run / "config.yaml") in message and "--init-from" in message, message
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing written
