"""Where image files are read from: the image root, or the resized-image cache built by
``mambaxray-ctl prepare images``.

Cache layout: ``<cache>/<relative path>.png`` for every image ``<root>/<relative path>``
(``a/b.dcm`` → ``a/b.dcm.png``, so that ``b.dcm`` and ``b.png`` never collide), plus
``<cache>/cache.json`` holding the size and source root, and ``<cache>/unreadable.jsonl``.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

from mambaxray_ctl.data.annotations import DataValidationError

MANIFEST_NAME = "cache.json"
UNREADABLE_NAME = "unreadable.jsonl"


def normalise_relpath(rel: str) -> str:
    """Posix form without ``.`` parts, as used for cache keys."""
    return posixpath.normpath(rel.replace("\\", "/"))


def cached_path(cache_dir: str | Path, rel: str) -> Path:
    """The cache file of the image at ``rel`` (relative to the image root)."""
    return Path(cache_dir) / (normalise_relpath(rel) + ".png")


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The cache manifest, or None when the folder holds none."""
    path = Path(cache_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_manifest(cache_dir: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(cache_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def require_cache(cache_dir: str | Path, size: int) -> None:
    """Raise unless ``cache_dir`` is an image cache made at ``size``."""
    manifest = read_manifest(cache_dir)
    if manifest is None:
        raise DataValidationError(
            f"{cache_dir} is not an image cache (no {MANIFEST_NAME}); "
            f"build it with: mambaxray-ctl prepare images --root IMAGE_ROOT --size {size} --out {cache_dir}"
        )
    if manifest.get("size") != size:
        raise DataValidationError(
            f"image cache {cache_dir} was built at size {manifest.get('size')}, the data is configured "
            f"for image_size={size}; rebuild it or point image_cache elsewhere"
        )


class ImageLocator:
    """Maps a path relative to the image root to the file to read (picklable, for workers)."""

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None) -> None:
        self.root = Path(root)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def __call__(self, rel: str) -> Path:
        if self.cache_dir is not None:
            return cached_path(self.cache_dir, rel)
        return self.root / rel
