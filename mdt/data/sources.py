"""Finding the input images: an ImageFolder tree or WebDataset tar shards of images.

Both become one sorted list of `SourceImage`s (what to read, its label, where it came from), so
that the shard plan is the same on every rank and in every re-run. Tar members are located by
their byte offset, so a DataLoader worker reads one image without scanning the tar.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from mdt.data.classes import ClassIndex, index_for_folders, index_for_labels
from mdt.errors import UserError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
TAR_IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass(frozen=True)
class SourceImage:
    """One input image. `path` is a file, or a tar holding it at [offset, offset + size)."""

    relpath: str  # stable name recorded in the output: "n01440764/x.JPEG" or "shard-0.tar/x.jpg"
    class_name: str
    label: int
    path: str
    offset: int = 0
    size: int = -1  # -1: the whole file

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.size < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)


@dataclass(frozen=True)
class InputSet:
    """All usable inputs, sorted, with the class index and a fingerprint of the listing."""

    description: str
    images: tuple[SourceImage, ...]
    classes: ClassIndex
    ignored_files: int  # files with non-image extensions in an ImageFolder tree
    rejected: tuple[tuple[str, str], ...] = ()  # (relpath, reason) found unusable while listing

    def fingerprint(self) -> str:
        """SHA-256 over (relpath, label) of every input: equal listings encode to equal shards."""
        digest = hashlib.sha256()
        for image in self.images:
            digest.update(f"{image.relpath}\t{image.label}\n".encode())
        return digest.hexdigest()


def list_inputs(spec: str, class_list: str | Path | None = None) -> InputSet:
    """Resolve INPUT: an ImageFolder root, a tar brace pattern (`shards-{000..009}.tar`), one tar,
    or a text file listing tar paths (one per line)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _list_image_folder(path, class_list)
    if "{" in spec or spec.endswith(".tar"):
        tars = [Path(p).expanduser() for p in braceexpand.braceexpand(spec)]
    elif path.is_file():
        tars = _read_tar_list(path)
    else:
        raise UserError(f"INPUT {spec}: no such folder or file; pass an ImageFolder root or tar shards.")
    return _list_tar_shards(spec, tars, class_list)


def _read_tar_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"INPUT {path}: cannot read it as a list of tar shards ({err}).") from err
    tars = [Path(line.strip()).expanduser() for line in lines if line.strip() and not line.startswith("#")]
    base = path.parent
    tars = [t if t.is_absolute() else base / t for t in tars]
    if not tars or not all(t.suffix == ".tar" for t in tars):
        raise UserError(
            f"INPUT {path}: expected an ImageFolder root, tar shards, or a text file with one .tar path per line."
        )
    return tars


def _list_image_folder(root: Path, class_list: str | Path | None) -> InputSet:
    class_dirs = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if class_dirs:
        found, ignored = _walk_class_folders(root, class_dirs)
        if not found:
            raise UserError(
                f"INPUT {root}: the class folders hold no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "check the path."
            )
    else:  # a flat folder (faces, say): one class, for unconditional training
        files = sorted(e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith("."))
        found = [(name, root.name) for name in files if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
        if not found:
            raise UserError(f"INPUT {root}: no class folders and no images; arrange the images as "
                            "ROOT/<class>/<image> (ImageNet's layout), or all in ROOT for an unconditional set.")
        ignored, class_dirs = len(files) - len(found), [root.name]
    classes = index_for_folders(class_dirs, class_list)
    found.sort()
    images = tuple(
        SourceImage(relpath=rel, class_name=name, label=classes.label(name), path=str(root / rel))
        for rel, name in found
    )
    return InputSet(str(root.resolve()), images, classes, ignored)


def _walk_class_folders(root: Path, class_dirs: list[str]) -> tuple[list[tuple[str, str]], int]:
    """(relpath, class name) of every image under the class folders, and the non-image files ignored."""
    found: list[tuple[str, str]] = []
    ignored = 0
    for class_name in class_dirs:
        for dirpath, dirnames, filenames in os.walk(root / class_name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in filenames:
                if filename.startswith("."):
                    continue
                if os.path.splitext(filename)[1].lower() not in IMAGE_EXTENSIONS:
                    ignored += 1
                    continue
                found.append((os.path.relpath(os.path.join(dirpath, filename), root), class_name))
    return found, ignored


def _list_tar_shards(spec: str, tars: list[Path], class_list: str | Path | None) -> InputSet:
    missing = [t for t in tars if not t.is_file()]
    if missing:
        raise UserError(
            f"INPUT {spec}: shard {missing[0]} does not exist ({len(missing)} missing); fix the pattern."
        )
    found: list[tuple[str, int, str, int, int]] = []  # (relpath, label, tar, offset, size)
    rejected: list[tuple[str, str]] = []
    for tar_path in tars:
        images, unusable = _scan_tar(tar_path)
        found.extend(images)
        rejected.extend(unusable)
    if not found:
        raise UserError(
            f"INPUT {spec}: the shards hold no images with a label (jpg/png/webp + cls members); check the shards."
        )
    classes = index_for_labels((f[1] for f in found), class_list)
    found.sort()
    images = tuple(
        SourceImage(
            relpath=rel, class_name=classes.names[label], label=label, path=tar, offset=off, size=size
        )
        for rel, label, tar, off, size in found
    )
    return InputSet(spec, images, classes, ignored_files=0, rejected=tuple(sorted(rejected)))


def _scan_tar(tar_path: Path) -> tuple[list[tuple[str, int, str, int, int]], list[tuple[str, str]]]:
    """Images with a `cls` label in one tar, as (relpath, label, tar, offset, size), and the
    images without a usable label, as (relpath, reason)."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(tar_path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                dirname, _, basename = info.name.rpartition("/")
                stem, dot, ext = basename.partition(".")  # WebDataset: the key ends at the first dot
                if not dot:
                    continue
                key = f"{dirname}/{stem}" if dirname else stem
                members.setdefault(key, {})[ext.lower()] = info
            labels = {
                key: _read_label(tar, fields["cls"]) for key, fields in members.items() if "cls" in fields
            }
    except (tarfile.TarError, OSError) as err:
        raise UserError(
            f"INPUT {tar_path}: not a readable tar file ({err}); fix or remove that shard."
        ) from err
    found, rejected = [], []
    for key, fields in members.items():
        image = next((fields[f] for f in TAR_IMAGE_FIELDS if f in fields), None)
        if image is None:
            continue
        relpath = f"{tar_path.name}/{image.name}"
        label = labels.get(key)
        if label is None:
            reason = "no cls member" if "cls" not in fields else "cls is not a non-negative integer"
            rejected.append((relpath, reason))
            continue
        found.append((relpath, label, str(tar_path), image.offset_data, image.size))
    return found, rejected


def _read_label(tar: tarfile.TarFile, info: tarfile.TarInfo) -> int | None:
    handle = tar.extractfile(info)
    text = handle.read().decode("utf-8", errors="replace").strip() if handle else ""
    return int(text) if text.isdigit() else None
