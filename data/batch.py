"""``Batch``: what ``ShardLoader`` yields, typed, and still readable like the dict it used to be.

A batch holds ``B = num_samples`` samples of one bucket. Per-sample fields (the mapping keys):

- ``video`` uint8 ``[B, 3, T, H, W]`` (pixel shards; with ``channels_last`` a strided view of
  ``[B, T, H, W, 3]`` memory) or ``latents`` float ``[B, C, t, h, w]`` (latent shards);
- ``actions`` int64 ``[B, T, S]``, ``camera`` float32 ``[B, T, 2]``;
- ``caption``, ``key`` list[str]; ``style`` list[list[str]]; ``epoch`` list[int];
- optional: ``refs`` list of uint8 ``[R, 3, H, W]``; ``text_emb`` ``[B, L, D]`` and
  ``text_mask`` ``[B, L]`` (latent caches with precomputed text); ``audio`` float32 ``[B, N]``
  (mono, ``ShardLoader(audio_rate=...)`` Hz, the window under the clip's frames) and
  ``audio_mask`` bool ``[B, N]`` (False where the file has no audio there, or none at all).

Batch-level facts (attributes, not mapping keys, so code iterating ``batch.items()`` only
ever sees per-sample values): ``clip_shape`` = ``(num_frames, height, width)`` of the pixel
clip (for latents: the clip they were encoded from), and ``num_samples``.

It is a frozen dataclass that also implements the read-only ``Mapping`` protocol over its
non-``None`` per-sample fields (transformers' ``ModelOutput`` pattern), so ``batch["video"]``,
``batch.get("refs")``, ``"latents" in batch``, ``dict(batch)`` and ``{**batch}`` work as they
did on the plain dict. Because it is a ``Mapping``, ``len(batch)`` counts fields; the batch
size is ``num_samples``.

Tiny CPU example::

    b = Batch(key=["a"], caption=[""], style=[[]], epoch=[0], actions=torch.zeros(1, 4, 0, dtype=torch.long),
              camera=torch.zeros(1, 4, 2), clip_shape=(4, 8, 8), video=torch.zeros(1, 3, 4, 8, 8, dtype=torch.uint8))
    b["video"].shape, b.num_samples, sorted(b)   # (1, 3, 4, 8, 8), 1, ['actions', 'camera', ...]
    b.to("cpu").select(1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Batch", "FIELDS"]

# Mapping keys, in the order the loader's dicts had them (pixel and latent batches).
FIELDS = ("video", "latents", "actions", "camera", "caption", "key", "style", "epoch", "refs",
          "text_emb", "text_mask", "audio", "audio_mask")


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` on a tensor, or on each tensor of a list (``refs``); anything else as it is."""
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, list) and any(torch.is_tensor(v) for v in value):
        return [fn(v) if torch.is_tensor(v) else v for v in value]
    return value


@dataclass(frozen=True, eq=False, repr=False)
class Batch(Mapping[str, Any]):
    """One homogeneous batch (see the module docstring for fields and shapes)."""

    key: list[str]
    caption: list[str]
    style: list[list[str]]
    epoch: list[int]
    actions: torch.Tensor
    camera: torch.Tensor
    clip_shape: tuple[int, int, int]
    video: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    refs: list[torch.Tensor] | None = None
    text_emb: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # Cheap invariants only (this runs once per batch in the loader workers).
        if (self.video is None) == (self.latents is None):
            raise ValueError("a Batch holds exactly one of video and latents")
        shape = tuple(int(s) for s in self.clip_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"clip_shape must be (num_frames, height, width) >= 1, got {self.clip_shape!r}")
        object.__setattr__(self, "clip_shape", shape)
        n = len(self.key)
        for name in FIELDS:
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"Batch.{name} has {len(value)} entries for {n} keys")

    # ------------------------------------------------------------------ Mapping protocol
    def __getitem__(self, name: str) -> Any:
        value = getattr(self, name, None) if name in FIELDS else None
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return (name for name in FIELDS if getattr(self, name) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name: object) -> bool:
        return name in FIELDS and getattr(self, name) is not None  # type: ignore[arg-type]

    def __repr__(self) -> str:
        parts = []
        for name, value in self.items():
            if torch.is_tensor(value):
                parts.append(f"{name}={value.dtype}{list(value.shape)}")
            elif name in ("key", "epoch"):
                parts.append(f"{name}={value!r}")
        return f"Batch(num_samples={self.num_samples}, clip_shape={self.clip_shape}, {', '.join(parts)})"

    # ------------------------------------------------------------------ helpers
    @property
    def num_samples(self) -> int:
        """Samples in the batch (``B``)."""
        return len(self.key)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return dataclasses.replace(self, **{name: _map_tensors(value, fn) for name, value in self.items()})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Every tensor (``refs`` too) on ``device``, contiguous: a ``channels_last`` video's
        transpose is paid there, once (as ``Trainer.next_batch`` does)."""
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking).contiguous())

    def pin_memory(self, device: torch.device | str | None = None) -> Batch:
        """Tensors in page-locked memory; torch's DataLoader pin thread calls this on custom
        types (``pin_memory=True``). ``device`` is accepted for that API and ignored."""
        return self._apply(lambda t: t.pin_memory())

    @classmethod
    def concat(cls, batches: list[Batch]) -> Batch:
        """One batch of every sample of ``batches`` in order (same clip shape and fields):
        tensors concatenated on dim 0, per-sample lists joined. ``audio``/``audio_mask``
        windows of different lengths (sources at other frame rates) are right-padded with
        silence / False, as the loader pads them within a batch."""
        first = batches[0]
        if any(b.clip_shape != first.clip_shape or set(b) != set(first) for b in batches):
            raise ValueError("Batch.concat: batches differ in clip_shape or fields")

        def cat(name: str) -> torch.Tensor:
            vals = [b[name] for b in batches]
            if name in ("audio", "audio_mask"):
                width = max(v.shape[-1] for v in vals)
                vals = [torch.cat([v, v.new_zeros(*v.shape[:-1], width - v.shape[-1])], -1)
                        for v in vals]
            return torch.cat(vals)

        fields = {name: (cat(name) if torch.is_tensor(value)
                         else [x for b in batches for x in b[name]])
                  for name, value in first.items()}
        return dataclasses.replace(first, **fields)

    def select(self, index: int | slice) -> Batch:
        """The first ``index`` samples (an ``int``), or the samples of a ``slice``."""
        part = slice(index) if isinstance(index, int) else index
        return dataclasses.replace(self, **{name: value[part] for name, value in self.items()})
