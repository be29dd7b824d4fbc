"""ADM preprocessing, mode conversion and the class index rules."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from helpers import encoded_bytes
from PIL import Image

from mdt.data.classes import imagenet_synsets, index_for_folders, index_for_labels, read_class_list
from mdt.data.images import DECODE_ERRORS, center_crop_adm, preprocess, to_rgb
from mdt.errors import UserError


@pytest.mark.parametrize("size", [(40, 30), (64, 64), (129, 300), (1000, 600), (3000, 200)])
def test_center_crop_is_square_at_the_resolution(size: tuple[int, int]) -> None:
    image = Image.new("RGB", size, (10, 20, 30))
    assert center_crop_adm(image, 64).size == (64, 64)


def test_center_crop_keeps_the_center() -> None:
    # A wide image, black | white | black; the center crop (plus bicubic's reach) sees only white.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, 80:220] = 255
    cropped = np.asarray(center_crop_adm(Image.fromarray(array), 64))
    assert cropped.min() >= 250


def test_box_halving_happens_while_twice_the_target() -> None:
    # 4x4 checkerboard cells of 0/255 average to mid-grey under BOX halving (bicubic from the
    # full size would ring); 512 -> 256 -> 128 -> 64 by halving only.
    array = (np.indices((512, 512)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = np.asarray(center_crop_adm(Image.fromarray(array).convert("RGB"), 64)).astype(int)
    assert np.abs(out - 127.5).max() <= 1


def test_modes_become_rgb() -> None:
    transparent = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)  # composited on white
    deep = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)  # not clipped from 65535 to 255 blindly
    mid = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))
    assert to_rgb(mid).getpixel((0, 0)) == (128, 128, 128)
    for mode in ("L", "LA", "P", "CMYK", "RGB", "1"):
        assert to_rgb(Image.new(mode, (8, 8))).mode == "RGB"


def test_preprocess_records_the_original_and_rejects_garbage() -> None:
    data = encoded_bytes(Image.new("L", (90, 50), 77), "PNG")
    decoded = preprocess(data, 32)
    assert decoded.pixels.shape == (32, 32, 3)
    assert decoded.pixels.dtype == np.uint8
    assert (decoded.width, decoded.height, decoded.mode) == (90, 50, "L")
    assert decoded.pixels.flags.writeable
    jpeg = encoded_bytes(Image.new("RGB", (64, 64)), "JPEG")
    for bad in (b"", b"not an image", jpeg[: len(jpeg) // 2]):
        with pytest.raises(DECODE_ERRORS):
            preprocess(bad, 32)


def test_shipped_synset_list_is_imagenet_1k_in_standard_order(imagenet_sample: Path) -> None:
    synsets = imagenet_synsets()
    assert len(synsets) == len(set(synsets)) == 1000
    assert synsets[0] == "n01440764"
    assert synsets[-1] == "n15075141"
    assert synsets == read_class_list(imagenet_sample / "synset_mapping.txt")


def test_synset_subset_keeps_standard_indices() -> None:
    index = index_for_folders(["n15075141", "n01443537"])
    assert index.rule == "imagenet-1k"
    assert len(index) == 1000
    assert index.label("n01443537") == 1
    assert index.label("n15075141") == 999


def test_other_folders_are_sorted() -> None:
    index = index_for_folders(["zebra", "ant", "n01443537"])
    assert index.rule == "sorted-folders"
    assert index.names == ("ant", "n01443537", "zebra")


def test_class_list_overrides_and_must_cover_the_folders(tmp_path: Path) -> None:
    listing = tmp_path / "classes.txt"
    listing.write_text("# my order\nzebra striped\nant\n\nbee\n")
    index = index_for_folders(["ant", "zebra"], listing)
    assert index.rule == "class-list"
    assert index.names == ("zebra", "ant", "bee")
    with pytest.raises(UserError, match="'cat'"):
        index_for_folders(["ant", "cat"], listing)
    listing.write_text("a\nb\na\n")
    with pytest.raises(UserError, match="twice"):
        read_class_list(listing)


def test_numeric_labels_and_class_list_bounds(tmp_path: Path) -> None:
    assert index_for_labels([0, 3]).names == ("0", "1", "2", "3")
    listing = tmp_path / "classes.txt"
    listing.write_text("a\nb\n")
    with pytest.raises(UserError, match="label 3"):
        index_for_labels([3], listing)


def _over_white(rgb: tuple[int, int, int], alpha: int) -> tuple[int, ...]:
    return tuple(round(c * alpha / 255 + 255 * (1 - alpha / 255)) for c in rgb)


# (PIL mode, the solid pixel value in that mode, the RGB it means, formats that store the mode):
# the expected colours are written out here, not taken from PIL's conversions.
MODES = [
    ("RGB", (200, 10, 10), (200, 10, 10), ("PNG", "JPEG", "WEBP")),
    ("L", 120, (120, 120, 120), ("PNG", "JPEG", "WEBP")),
    ("RGBA", (200, 10, 10, 255), (200, 10, 10), ("PNG", "WEBP")),
    ("RGBA", (200, 10, 10, 100), _over_white((200, 10, 10), 100), ("PNG", "WEBP")),
    ("RGBA", (200, 10, 10, 0), (255, 255, 255), ("PNG", "WEBP")),  # transparent: white
    ("LA", (40, 0), (255, 255, 255), ("PNG",)),
    ("LA", (40, 255), (40, 40, 40), ("PNG",)),
    ("CMYK", (0, 255, 55, 0), (255, 0, 200), ("JPEG",)),
    ("I;16", 30000, (round(30000 / 65535 * 255),) * 3, ("PNG",)),  # 16-bit grey rescaled, not clipped
    ("I;16", 65535, (255, 255, 255), ("PNG",)),
    ("1", 1, (255, 255, 255), ("PNG",)),
]


@pytest.mark.parametrize(("mode", "value", "rgb", "fmt"),
                         [(mode, value, rgb, fmt) for mode, value, rgb, fmts in MODES for fmt in fmts])
def test_decoded_bytes_of_every_mode_roundtrip_through_formats(mode, value, rgb, fmt) -> None:
    buffer = io.BytesIO()
    Image.new(mode, (70, 70), value).save(buffer, format=fmt)
    decoded = preprocess(buffer.getvalue(), 64)
    assert decoded.pixels.shape == (64, 64, 3)
    if fmt == "PNG":  # PNG stores every one of these modes as it is
        assert decoded.mode == mode
    tolerance = 0 if fmt == "PNG" else 8  # JPEG and WEBP are lossy
    assert np.abs(decoded.pixels.reshape(-1, 3).astype(int) - rgb).max() <= tolerance, decoded.pixels[32, 32]


def test_palette_images_keep_their_colours_and_transparency() -> None:
    palette = Image.new("RGB", (70, 70), (30, 160, 90)).quantize(4)
    assert np.all(preprocess(encoded_bytes(palette, "PNG"), 64).pixels == (30, 160, 90))
    palette.info["transparency"] = palette.getpixel((0, 0))
    assert np.all(preprocess(encoded_bytes(palette, "PNG"), 64).pixels == 255)
