"""Image decoding, resizing, normalisation and the stage-1 augmentation, with PIL and torch only.

Every decoder returns a float tensor ``(C, H, W)`` in ``[0, 1]`` with ``C`` = 1 (grayscale) or 3
(colour); channels are expanded to 3 only at the end of a transform, so grayscale work is done once.

* PNG/JPEG/other PIL formats: 8-bit data is divided by 255, 16-bit grayscale (``I;16``) by 65535,
  32-bit float (``F``) is min-max scaled; alpha channels are dropped, palettes expanded.
* DICOM (needs the optional ``pydicom``): first frame, modality LUT (rescale slope/intercept),
  then the VOI LUT or the window when the file has one, then min-max scaled to ``[0, 1]``;
  ``MONOCHROME1`` (bright = air) is inverted so that bone is always bright.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}) | DICOM_SUFFIXES
_PYDICOM_HINT = "reading DICOM needs pydicom: pip install 'mambaxray-ctl[dicom]' (or pip install pydicom)"


class ImageDecodeError(Exception):
    """An image file is missing, unreadable or undecodable: ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(str(path), reason)
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(132)[128:] == b"DICM"


def is_dicom(path: Path) -> bool:
    """True for ``.dcm``/``.dicom`` files and for files carrying the DICOM preamble."""
    return path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_magic(path)


def _import_pydicom(path: Path) -> ModuleType:
    try:
        import pydicom
    except ImportError:
        raise ImageDecodeError(path, _PYDICOM_HINT) from None
    return pydicom


def _dicom_luts() -> tuple[Callable[..., np.ndarray], Callable[..., np.ndarray]]:
    try:  # pydicom >= 3
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _minmax(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def _decode_dicom(path: Path) -> Tensor:
    pydicom = _import_pydicom(path)
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour (pydicom converts YBR to RGB)
        return torch.from_numpy(_minmax(pixels)).permute(2, 0, 1).contiguous()
    apply_modality_lut, apply_voi_lut = _dicom_luts()
    pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    gray = _minmax(pixels)
    if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        gray = 1.0 - gray
    return torch.from_numpy(gray)[None]


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """(H, W) or (H, W, 3) float32 in [0, 1]."""
    mode = image.mode
    if mode in {"1", "L", "LA"}:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I (32-bit int holding 16-bit data)
        return np.clip(np.asarray(image, dtype=np.float32) / 65535.0, 0.0, 1.0)
    if mode == "F":
        return _minmax(np.asarray(image))
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0


def load_image(path: str | Path) -> Tensor:
    """Decode an image file into a ``(C, H, W)`` float tensor in ``[0, 1]``, C = 1 or 3.

    :raises ImageDecodeError: the file is missing, not an image, truncated, or DICOM without pydicom.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES:
            return _decode_dicom(path)
        try:
            with Image.open(path) as image:
                array = _pil_to_array(image)
        except UnidentifiedImageError:
            if _has_dicom_magic(path):
                return _decode_dicom(path)
            raise
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except Exception as exc:  # PIL and pydicom raise many types for corrupt data
        raise ImageDecodeError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def check_image_header(path: str | Path) -> None:
    """Cheap check: the file exists and its header parses (no pixel decoding).

    :raises ImageDecodeError: with the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found")
    try:
        if is_dicom(path):
            ds = _import_pydicom(path).dcmread(path, stop_before_pixels=True)
            if not (int(getattr(ds, "Rows", 0) or 0) and int(getattr(ds, "Columns", 0) or 0)):
                raise ImageDecodeError(path, "DICOM header has no image size (Rows/Columns)")
            return
        with Image.open(path) as image:
            width, height = image.size
        if not (width and height):
            raise ImageDecodeError(path, f"image has size {width}x{height}")
    except ImageDecodeError:
        raise
    except Exception as exc:
        raise ImageDecodeError(path, f"unreadable header ({type(exc).__name__}: {exc})") from exc


def resize(image: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Antialiased bicubic resize of ``(C, H, W)`` to ``size`` (aspect not kept), clamped to [0, 1]."""
    height, width = (size, size) if isinstance(size, int) else size
    if image.shape[-2:] == (height, width):
        return image
    out = F.interpolate(image[None], size=(height, width), mode="bicubic", antialias=True)
    return out[0].clamp_(0.0, 1.0)


def to_rgb(image: Tensor) -> Tensor:
    """``(1, H, W)`` → ``(3, H, W)``; colour images pass through."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def save_image(image: Tensor, path: str | Path) -> None:
    """Write a ``[0, 1]`` tensor as PNG: grayscale as 16-bit, colour as 8-bit RGB."""
    array = image.clamp(0.0, 1.0).numpy()
    if array.shape[0] == 1:
        pil = Image.fromarray(np.rint(array[0] * 65535.0).astype(np.uint16))
    else:
        pil = Image.fromarray(np.rint(array.transpose(1, 2, 0) * 255.0).astype(np.uint8), mode="RGB")
    pil.save(path, format="PNG")


class Normalize:
    """Channel-wise ``(x - mean) / std`` after expanding to 3 channels."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each, std > 0 (got mean={mean}, std={std})")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Tensor) -> Tensor:
        return (to_rgb(image) - self.mean) / self.std


class EvalTransform:
    """Resize to ``size`` × ``size`` (bicubic, aspect not kept) and normalise: stages 2–3 and evaluation."""

    def __init__(self, size: int, normalize: Normalize) -> None:
        self.size = size
        self.normalize = normalize

    def __call__(self, image: Tensor) -> Tensor:
        return self.normalize(resize(image, self.size))


class RandomResizedCropFlip:
    """Stage-1 augmentation: random resized crop (area ``scale``, aspect ``ratio``), bicubic resize
    to ``size``, horizontal flip with probability ``flip_p``, normalisation.

    The crop box is drawn up to 10 times; if none fits, the largest centred box with a clamped
    aspect ratio is used. Randomness comes from torch's global generator (seeded per worker by
    Lightning's ``seed_everything(workers=True)``) unless ``generator`` is given.
    """

    def __init__(
        self,
        size: int,
        normalize: Normalize,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"bad crop scale {scale} or ratio {ratio}")
        self.size, self.normalize, self.scale, self.ratio, self.flip_p = size, normalize, scale, ratio, flip_p
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, crop height, crop width)."""
        area = height * width
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * self._uniform(*self.scale)
            aspect = math.exp(self._uniform(log_low, log_high))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (), generator=self.generator))
                left = int(torch.randint(0, width - w + 1, (), generator=self.generator))
                return top, left, h, w
        aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, image: Tensor) -> Tensor:
        top, left, h, w = self.crop_box(*image.shape[-2:])
        out = resize(image[:, top : top + h, left : left + w], self.size)
        if float(torch.rand((), generator=self.generator)) < self.flip_p:
            out = out.flip(-1)
        return self.normalize(out)
