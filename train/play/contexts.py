"""Context frames for ``worldline-play``: the first frames of clips in the WebDataset shard
folders given on the command line, or an image the user uploads.

Security: the page names a context by an id from :meth:`ContextLibrary.ids` (never a path);
an id not in that list is rejected, so no request can make the server read any other file.
Shards are only read from regular ``*.tar`` files directly inside the given folders (a
symlink pointing outside is skipped). Uploaded images are decoded by Pillow with a pixel
limit (decompression bombs) and only PNG/JPEG/WebP/BMP are accepted.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["Context", "ContextLibrary", "image_from_bytes", "image_from_base64"]

MAX_MEMBER_BYTES = 64 << 20  # an mp4 member larger than this is not a context clip
MAX_IMAGE_PIXELS = 16_000_000
IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP"}


@dataclass
class Context:
    """A start for a session: ``frame`` uint8 [3, H, W] at the model's size, a caption."""

    id: str
    frame: torch.Tensor
    caption: str = ""


def _fit(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [h, w, 3] → [3, H, W] as ``worldline-sample sample.first_image=`` fits it at the
    data default ``data.max_crop`` (a recording saves the fitted frame, so it replays
    identically)."""
    from worldline.data.video import DEFAULT_MAX_CROP
    from worldline.train.sampling import fit_image

    return fit_image(rgb, size, DEFAULT_MAX_CROP)


def image_from_bytes(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """An uploaded image file's bytes → uint8 [3, H, W] at ``size``; ValueError if it is not
    a PNG/JPEG/WebP/BMP image or too large."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise ValueError(f"image format {img.format} not accepted "
                                 f"({sorted(IMAGE_FORMATS)})")
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image of {img.width}x{img.height} pixels is too large")
            rgb = np.array(img.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image: {e}") from None
    return _fit(rgb, size)


def image_from_base64(text: str, size: tuple[int, int]) -> torch.Tensor:
    """A ``data:image/...;base64,`` URL (or bare base64) → uint8 [3, H, W]."""
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError as e:
        raise ValueError(f"image: invalid base64 ({e})") from None
    return image_from_bytes(data, size)


class ContextLibrary:
    """Context clips of the shard folders given on the command line (first ``limit`` clips).

    Clips are listed up front (tar headers only); a clip's first frame is decoded when it is
    first used and kept."""

    def __init__(self, folders: list[str | Path], size: tuple[int, int], limit: int = 64) -> None:
        self.size = size
        self._where: dict[str, tuple[Path, str, Optional[str], Optional[str]]] = {}
        self._cache: dict[str, Context] = {}
        for folder in folders:
            self._scan(Path(folder).resolve(), limit)

    def _scan(self, folder: Path, limit: int) -> None:
        if not folder.is_dir():
            raise FileNotFoundError(f"--shards: no folder at {folder}")
        for shard in sorted(folder.glob("*.tar")):
            real = shard.resolve()
            if not real.is_file() or real.parent != folder:
                log.warning("skipping %s: not a regular file inside %s", shard, folder)
                continue
            members: dict[str, dict[str, str]] = {}
            with tarfile.open(real) as tar:
                for m in tar.getmembers():
                    if not m.isfile() or "." not in m.name or m.size > MAX_MEMBER_BYTES:
                        continue
                    key, ext = m.name.split(".", 1)
                    members.setdefault(key, {})[ext] = m.name
            for key, exts in members.items():
                if "mp4" not in exts or len(self._where) >= limit:
                    continue
                cid = f"{folder.name}/{shard.name}/{key}"
                self._where[cid] = (real, exts["mp4"], exts.get("txt"), exts.get("json"))

    def ids(self) -> list[str]:
        """The ids the page may ask for, in shard order."""
        return list(self._where)

    def get(self, cid: str) -> Context:
        """The context ``cid`` (KeyError for anything not listed: no path is ever opened
        from what the page sends)."""
        if cid not in self._where:
            raise KeyError(f"unknown context {cid[:80]!r}")
        if cid not in self._cache:
            from worldline.data.video import decode_clip

            shard, mp4_name, txt_name, json_name = self._where[cid]
            with tarfile.open(shard) as tar:
                mp4 = tar.extractfile(mp4_name).read()
                caption = ""
                if txt_name:
                    caption = tar.extractfile(txt_name).read().decode("utf-8", "replace")
                elif json_name:
                    caption = str(json.loads(tar.extractfile(json_name).read()).get("caption",
                                                                                   ""))
            frames, _ = decode_clip(mp4, 1)
            self._cache[cid] = Context(cid, _fit(np.asarray(frames)[0], self.size),
                                       caption.strip())
        return self._cache[cid]
