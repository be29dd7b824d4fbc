"""A small image classifier as a probe: do generated samples show the class they were asked for?

FID needs Inception weights and thousands of samples; on a small labelled dataset (the demo's
shapes) a classifier trained on the real images answers a sharper question with no download: the
fraction of samples of class k that it calls k. Its accuracy on held-out real images is reported
beside it, as the ceiling the samples are measured against.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn

from mdt.data.sources import list_inputs
from mdt.errors import UserError
from mdt.fileio import atomic_path, read_json_object, read_safetensors, write_json
from mdt.sample.images import read_samples

WEIGHTS = "classifier.safetensors"
CONFIG = "classifier.json"


def make_classifier(num_classes: int, width: int = 32) -> nn.Module:
    """Two conv stages and a linear head: ample for toy data, seconds per epoch on a CPU."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GroupNorm(8, 2 * width), nn.SiLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


@dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]


def read_image_folder(root: Path, size: int | None = None) -> ImageSet:
    """ROOT/<class>/<image>, listed and labelled exactly as `mdt encode` lists and labels it."""
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass an image folder laid out as ROOT/<class>/<image>")
    inputs = list_inputs(str(root))
    images = []
    for item in inputs.images:
        with Image.open(item.path) as img:
            img = img.convert("RGB")
            if size is not None and img.size != (size, size):
                img = img.resize((size, size), Image.BICUBIC)
            images.append(np.asarray(img))
    if len({im.shape for im in images}) != 1:
        raise UserError(f"{root} mixes image sizes; pass --size to resize them to one")
    labels = np.asarray([item.label for item in inputs.images], dtype=np.int64)
    return ImageSet(np.stack(images), labels, list(inputs.classes.names))


def _to_tensor(images: np.ndarray) -> Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [model(_to_tensor(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def train_classifier(train_dir: Path, val_dir: Path | None, out: Path, *, epochs: int = 6, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0) -> dict:
    """Train on `train_dir`, report accuracy on `val_dir`, write OUT/classifier.{safetensors,json}."""
    train = read_image_folder(train_dir)
    size = train.images.shape[1]
    val = read_image_folder(val_dir, size) if val_dir is not None else None
    if val is not None and val.class_names != train.class_names:
        raise UserError(f"{val_dir} has classes {val.class_names} but {train_dir} has {train.class_names}; "
                        "pass the two splits of one dataset")
    torch.manual_seed(seed)
    model = make_classifier(len(train.class_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    x, y = _to_tensor(train.images), torch.from_numpy(train.labels)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            batch = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # the encoder's --flip augmentation, so flips look real
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    summary = {
        "class_names": train.class_names,
        "image_size": size,
        "train_images": len(x),
        "epochs": epochs,
        "train_accuracy": float((predict(model, train.images) == train.labels).mean()),
        "val_accuracy": float((predict(model, val.images) == val.labels).mean()) if val is not None else None,
        "val_images": len(val.labels) if val is not None else 0,
        "train_seconds": round(time.perf_counter() - start, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out / CONFIG, summary)
    return summary


def load_classifier(folder: Path) -> tuple[nn.Module, dict]:
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"{folder} holds no classifier; make one with `mdt classifier train --out {folder}`")
    fix = f"train it again with `mdt classifier train --out {folder}`"
    config = read_json_object(folder / CONFIG, fix)
    if not all(key in config for key in ("class_names", "image_size", "val_accuracy")):
        raise UserError(f"{folder / CONFIG} lacks class_names, image_size or val_accuracy; {fix}")
    model = make_classifier(len(config["class_names"]))
    try:
        model.load_state_dict(read_safetensors(folder / WEIGHTS, fix))
    except RuntimeError:  # names or shapes of another network
        raise UserError(f"{folder / WEIGHTS} does not hold the weights {folder / CONFIG} describes; {fix}") from None
    return model, config


def score_samples(classifier_dir: Path, samples: Path) -> dict:
    """Class accuracy of generated samples (a folder with samples.npz, or the npz itself)."""
    model, config = load_classifier(classifier_dir)
    images, labels, names = read_samples(samples)
    if names is not None and names != config["class_names"]:
        raise UserError(f"the samples in {samples} are of classes {names} but the classifier in {classifier_dir} "
                        f"knows {config['class_names']}; train the classifier on the images the model was trained on")
    size = config["image_size"]
    if images.shape[1:3] != (size, size):
        images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])
    predicted = predict(model, images)
    num_classes = len(config["class_names"])
    per_class = {
        config["class_names"][k]: float((predicted[labels == k] == k).mean())
        for k in range(num_classes) if (labels == k).any()
    }
    return {
        "class_accuracy": float((predicted == labels).mean()),
        "class_accuracy_per_class": per_class,
        "classifier_val_accuracy": config["val_accuracy"],
        "chance_accuracy": 1.0 / num_classes,
        "num_samples_scored": int(len(labels)),
    }
