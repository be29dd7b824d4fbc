"""The demo's own pieces: the shapes dataset, the probe classifier and the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mdt.data.shapes import SHAPE_CLASSES, ShapesConfig, write_shapes_dataset
from mdt.errors import UserError
from mdt.eval.classifier import read_image_folder, score_samples, train_classifier
from mdt.eval.plots import cumulative_wall_time, plot_losses
from mdt.eval.side_by_side import write_side_by_side
from mdt.sample.images import write_npz


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(ShapesConfig(out=root, size=16, train_per_class=60, val_per_class=20))
    return root


def test_shapes_layout_is_deterministic_and_resumable(shapes: Path, tmp_path: Path) -> None:
    train = read_image_folder(shapes / "train")
    assert train.class_names == list(SHAPE_CLASSES)
    assert train.images.shape == (360, 16, 16, 3)
    assert np.bincount(train.labels).tolist() == [60] * 6
    # Another run with fewer images per class draws the same first images; a missing one is redrawn.
    again = tmp_path / "again"
    write_shapes_dataset(ShapesConfig(out=again, size=16, train_per_class=2, val_per_class=0))
    first = again / "train" / "2-blue-triangle" / "00001.png"
    assert first.read_bytes() == (shapes / "train" / "2-blue-triangle" / "00001.png").read_bytes()
    first.unlink()
    write_shapes_dataset(ShapesConfig(out=again, size=16, train_per_class=2, val_per_class=0))
    assert first.read_bytes() == (shapes / "train" / "2-blue-triangle" / "00001.png").read_bytes()
    # Splits never share an image.
    assert (shapes / "val" / "0-red-disc" / "00000.png").read_bytes() != \
        (shapes / "train" / "0-red-disc" / "00000.png").read_bytes()


def _as_samples(folder: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str] | None) -> Path:
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{i:06d}.png")
        Image.fromarray(image).save(paths[-1])
    write_npz(folder / "samples.npz", paths, labels.tolist())
    if class_names is not None:
        (folder / "sample_config.json").write_text(json.dumps({"class_names": class_names}))
    return folder


def test_classifier_tells_the_classes_apart_and_scores_samples(shapes: Path, tmp_path: Path) -> None:
    summary = train_classifier(shapes / "train", shapes / "val", tmp_path / "cls", epochs=4)
    assert summary["val_accuracy"] >= 0.9, summary
    val = read_image_folder(shapes / "val")
    # Real held-out images stand in for perfect samples; shuffled labels for samples of the wrong class.
    good = score_samples(tmp_path / "cls", _as_samples(tmp_path / "good", val.images, val.labels, val.class_names))
    assert good["class_accuracy"] >= 0.9
    assert set(good["class_accuracy_per_class"]) == set(SHAPE_CLASSES)
    wrong = (val.labels + 1) % len(SHAPE_CLASSES)
    bad = score_samples(tmp_path / "cls", _as_samples(tmp_path / "bad", val.images, wrong, None))
    assert bad["class_accuracy"] <= 0.1
    renamed = _as_samples(tmp_path / "other", val.images[:3], val.labels[:3], [f"c{k}" for k in range(6)])
    with pytest.raises(UserError, match="classes"):
        score_samples(tmp_path / "cls", renamed)
    with pytest.raises(UserError, match="no classifier"):
        score_samples(tmp_path / "nothing", renamed)


def test_plot_of_a_resumed_run(tmp_path: Path) -> None:
    records = [{"step": 10, "loss": 1.0, "wall_time_s": 5.0}, {"step": 20, "loss": 0.5, "wall_time_s": 10.0},
               {"step": 20, "val_loss": 0.6, "wall_time_s": 11.0},
               {"step": 30, "loss": 0.4, "wall_time_s": 4.0}]  # resumed: the clock restarted
    assert cumulative_wall_time(records) == [5.0, 10.0, 11.0, 15.0]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    info = plot_losses(tmp_path, tmp_path / "loss.png")
    assert info == {"train_points": 3, "val_points": 1, "last_step": 30}
    with Image.open(tmp_path / "loss.png") as image:
        assert image.size[0] > 500
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="line 1"):
        plot_losses(tmp_path, tmp_path / "x.png")


def test_side_by_side_puts_each_class_real_row_above_its_sample_row(shapes: Path, tmp_path: Path) -> None:
    val = read_image_folder(shapes / "val")
    # Samples: the held-out images themselves, so each sample row must equal the real row above it.
    order = np.argsort(val.labels, kind="stable")
    samples = _as_samples(tmp_path / "s", val.images[order], val.labels[order], val.class_names)
    out = tmp_path / "compare.png"
    info = write_side_by_side(shapes / "val", samples, out, per_class=4)
    assert info == {"classes": len(SHAPE_CLASSES), "per_class": 4}
    grid = np.asarray(Image.open(out).convert("RGB"))
    tile = grid.shape[1] // 4
    row = grid.shape[0] // (2 * len(SHAPE_CLASSES))
    for k in range(len(SHAPE_CLASSES)):
        real_row = grid[2 * k * row:(2 * k + 1) * row - 14]
        sample_row = grid[(2 * k + 1) * row:(2 * k + 2) * row - 14]
        assert np.array_equal(real_row, sample_row), f"class {k}"
    assert tile * 4 == grid.shape[1]
    with pytest.raises(UserError, match="no images of class"):
        write_side_by_side(shapes / "train" / "0-red-disc", samples, out)
