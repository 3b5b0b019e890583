"""Image decoding (8/16-bit PNG, RGB, RGBA, JPEG, DICOM incl. MONOCHROME1 and windowing), transforms."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mambaxray_ctl.data.images import (
    EvalTransform,
    ImageDecodeError,
    Normalize,
    RandomResizedCropFlip,
    check_image_header,
    load_image,
    resize,
    save_image,
)
from test_data_helpers import write_corrupt_png, write_dicom, write_png, write_truncated_png

REAL_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_images"


def test_png_8bit_16bit_rgb_rgba(tmp_path: Path) -> None:
    gray = load_image(write_png(tmp_path / "g.png", mode="L"))
    assert gray.shape == (1, 32, 32) and gray.dtype == torch.float32
    expected = np.asarray(Image.open(tmp_path / "g.png"), dtype=np.float32) / 255
    assert torch.allclose(gray[0], torch.from_numpy(expected))

    deep = load_image(write_png(tmp_path / "d.png", mode="I;16"))
    raw16 = np.asarray(Image.open(tmp_path / "d.png")).astype(np.float32)
    assert Image.open(tmp_path / "d.png").mode == "I;16"
    assert deep.shape == (1, 32, 32)
    assert torch.allclose(deep[0], torch.from_numpy(raw16 / 65535))

    rgb = load_image(write_png(tmp_path / "c.png", mode="RGB"))
    assert rgb.shape == (3, 32, 32) and rgb.min() >= 0 and rgb.max() <= 1
    rgba = load_image(write_png(tmp_path / "a.png", mode="RGBA"))
    raw = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float32)[..., :3] / 255
    assert rgba.shape == (3, 32, 32)
    assert torch.allclose(rgba.permute(1, 2, 0), torch.from_numpy(raw))  # alpha dropped


def test_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "x.jpg"
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(path, quality=95)
    image = load_image(path)
    assert image.shape == (3, 20, 30)
    assert abs(float(image.mean()) - 128 / 255) < 0.02


def test_dicom_monochrome1_is_inverted(tmp_path: Path) -> None:
    pixels = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # dark → bright left to right
    mono2 = load_image(write_dicom(tmp_path / "m2.dcm", pixels))
    mono1 = load_image(write_dicom(tmp_path / "m1.dcm", pixels, photometric="MONOCHROME1"))
    assert mono2.shape == mono1.shape == (1, 8, 64)
    assert float(mono2[0, 0, 0]) == 0.0 and float(mono2[0, 0, -1]) == 1.0
    assert torch.allclose(mono1, 1.0 - mono2)


def test_dicom_window_is_applied(tmp_path: Path) -> None:
    pixels = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    image = load_image(write_dicom(tmp_path / "w.dcm", pixels, window=(1000, 200)))[0, 0]
    values = pixels[0].astype(np.float32)
    assert torch.all(image[values < 890] == 0.0)
    assert torch.all(image[values > 1110] == 1.0)
    inside = image[(values > 920) & (values < 1080)]
    assert torch.all((inside > 0) & (inside < 1)) and torch.all(inside[1:] > inside[:-1])


def test_dicom_detected_without_suffix_and_header_check(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "noext", np.zeros((4, 4), np.uint16) + 7)
    check_image_header(path)
    assert load_image(path).shape == (1, 4, 4)


def test_dicom_without_pydicom_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "x.dcm", np.zeros((4, 4), np.uint16))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom -> ImportError
    with pytest.raises(ImageDecodeError, match=r"x\.dcm: reading DICOM needs pydicom: pip install"):
        load_image(path)
    with pytest.raises(ImageDecodeError, match="needs pydicom"):
        check_image_header(path)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match=r"missing\.png: file not found"):
        load_image(tmp_path / "missing.png")
    corrupt = write_corrupt_png(tmp_path / "c.png")
    with pytest.raises(ImageDecodeError, match="unreadable header"):
        check_image_header(corrupt)
    truncated = write_truncated_png(tmp_path / "t.png")
    check_image_header(truncated)  # header intact: only a full decode finds it
    with pytest.raises(ImageDecodeError, match=r"t\.png: cannot decode"):
        load_image(truncated)


def test_resize_normalize_and_cache_roundtrip(tmp_path: Path) -> None:
    image = torch.rand(1, 50, 80)
    out = resize(image, 24)
    assert out.shape == (1, 24, 24) and out.min() >= 0 and out.max() <= 1
    assert resize(out, 24) is out
    flat = EvalTransform(16, Normalize())(torch.full((1, 40, 40), 0.485))
    assert flat.shape == (3, 16, 16)
    assert torch.allclose(flat[0], torch.zeros(16, 16), atol=1e-5)  # (0.485 - mean_r) / std_r
    custom = Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])(torch.ones(3, 2, 2))
    assert torch.allclose(custom, torch.ones(3, 2, 2))
    with pytest.raises(ValueError, match="3 values"):
        Normalize([0.5], [0.5])
    save_image(out, tmp_path / "g.png")
    assert torch.allclose(load_image(tmp_path / "g.png"), out, atol=1 / 65535)
    rgb = torch.rand(3, 8, 8)
    save_image(rgb, tmp_path / "c.png")
    assert torch.allclose(load_image(tmp_path / "c.png"), rgb, atol=1 / 255)


def test_random_resized_crop_flip() -> None:
    image = torch.linspace(0, 1, 100).repeat(1, 60, 1)  # brightness grows to the right
    crops = [
        RandomResizedCropFlip(16, Normalize(), generator=torch.Generator().manual_seed(seed))
        for seed in (0, 0, 1)
    ]
    a, b, c = (crop(image) for crop in crops)
    assert a.shape == (3, 16, 16)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded
    areas = []
    crop = RandomResizedCropFlip(16, Normalize(), generator=torch.Generator().manual_seed(3))
    for _ in range(200):
        top, left, h, w = crop.crop_box(60, 100)
        assert top >= 0 and top + h <= 60 and left >= 0 and left + w <= 100
        areas.append(h * w / 6000)
    assert min(areas) >= 0.19 and max(areas) <= 1.0 and np.mean(areas) > 0.4
    never = RandomResizedCropFlip(16, Normalize(), scale=(1.0, 1.0), flip_p=0.0)
    always = RandomResizedCropFlip(16, Normalize(), scale=(1.0, 1.0), flip_p=1.0)
    assert torch.allclose(never(image).flip(-1), always(image), atol=1e-5)  # full image, flipped
    assert float(never(image)[0, 0, -1]) > float(never(image)[0, 0, 0])


@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason="../shared/data is absent")
@pytest.mark.parametrize(
    ("relative", "shape"),
    [
        ("iu_xray/CXR1900_IM-0584/0.png", (3, 512, 512)),
        ("iu_xray/CXR7_IM-2263/1.png", (3, 512, 512)),
        ("nih_cxr14/00000001_000.png", (1, 512, 512)),
        ("other/frontal_sample.jpg", (3, 885, 1036)),
        ("other/siim_pneumothorax_sample.dcm", (1, 1024, 1024)),
    ],
)
def test_real_images_load(relative: str, shape: tuple[int, ...]) -> None:
    path = REAL_IMAGES / relative
    check_image_header(path)
    image = load_image(path)
    assert tuple(image.shape) == shape
    assert 0.0 <= float(image.min()) < 0.1 and 0.9 < float(image.max()) <= 1.0
    assert EvalTransform(224, Normalize())(image).shape == (3, 224, 224)
