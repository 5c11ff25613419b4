"""Resolution x frame-count buckets with per-bucket batch sizes.

A bucket is ``(height, width, num_frames, batch_size)``. Every batch comes from one bucket, so
it is homogeneous; per-bucket batch sizes keep tokens per batch (``B*T*H*W``) roughly constant
(:func:`buckets_for_budget`). A video goes to the *largest* bucket (most ``T*H*W``) it fits:
enough frames (or seconds, at a target fps) for the bucket's clip and, unless ``upscale``, at
least the bucket's height and width. Ties go to the bucket whose aspect ratio is closest, then
to the earlier one. Assignment reads only container headers (``VideoInfo``), never frames, so
a resumed loader can re-assign a sample without decoding it.

Tiny example::

    buckets = buckets_for_budget([(64, 64), (32, 64)], [17, 9], tokens_per_batch=8 * 17 * 64 * 64)
    # [Bucket(64, 64, 17, 8), Bucket(64, 64, 9, 15), Bucket(32, 64, 17, 16), Bucket(32, 64, 9, 30)]
    BucketSet(buckets).assign(info)   # -> index of the bucket, or raises NoBucket
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from worldline.data.probe import VideoInfo

__all__ = ["Bucket", "BucketSet", "NoBucket", "buckets_for_budget"]


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    num_frames: int
    batch_size: int

    def __post_init__(self) -> None:
        if min(self.height, self.width, self.num_frames, self.batch_size) < 1:
            raise ValueError(f"bucket fields must be >= 1: {self}")

    @property
    def tokens(self) -> int:
        """Pixels per sample, ``T * H * W`` (proportional to latent tokens)."""
        return self.num_frames * self.height * self.width

    @classmethod
    def parse(cls, spec: "Bucket | Mapping | Sequence[int]") -> "Bucket":
        """From a ``Bucket``, a mapping (``{resolution: [H, W], num_frames, batch_size}`` or
        ``{height, width, num_frames, batch_size}``) or ``[H, W, T, B]``."""
        if isinstance(spec, Bucket):
            return spec
        if isinstance(spec, Mapping):
            d = dict(spec)
            if "resolution" in d:
                d["height"], d["width"] = d.pop("resolution")
            return cls(int(d["height"]), int(d["width"]), int(d["num_frames"]), int(d["batch_size"]))
        h, w, t, b = spec
        return cls(int(h), int(w), int(t), int(b))


class NoBucket(ValueError):
    """No bucket fits a video; ``reason`` is ``too_short`` or ``too_small``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def buckets_for_budget(
    resolutions: Iterable[Sequence[int]], frame_counts: Iterable[int], tokens_per_batch: int
) -> list[Bucket]:
    """All ``resolution x frame count`` buckets with ``batch_size = tokens_per_batch // tokens``
    (at least 1), largest first."""
    out = [
        Bucket(int(h), int(w), int(t), max(1, tokens_per_batch // (int(t) * int(h) * int(w))))
        for h, w in resolutions
        for t in frame_counts
    ]
    return sorted(out, key=lambda b: -b.tokens)


class BucketSet:
    """Assigns videos to buckets from header facts; ``frame_stride`` or ``fps`` says how much
    of the source a bucket's clip needs."""

    def __init__(
        self,
        buckets: Sequence[Bucket | Mapping | Sequence[int]],
        upscale: bool = False,
        frame_stride: int = 1,
        fps: float | None = None,
    ):
        self.buckets = [Bucket.parse(b) for b in buckets]
        if not self.buckets:
            raise ValueError("need at least one bucket")
        self.upscale, self.frame_stride, self.fps = upscale, frame_stride, fps

    def __len__(self) -> int:
        return len(self.buckets)

    def __getitem__(self, i: int) -> Bucket:
        return self.buckets[i]

    def signature(self) -> list:
        """JSON-able identity (part of the loader state: bucket ids index this list)."""
        return [[asdict(b) for b in self.buckets], self.upscale, self.frame_stride, self.fps]

    def frames_fit(self, bucket: Bucket, info: VideoInfo) -> bool:
        if self.fps is not None:
            return max(info.span, info.duration - 1e-6) + 1e-6 >= (bucket.num_frames - 1) / self.fps
        return info.num_frames >= (bucket.num_frames - 1) * self.frame_stride + 1

    def assign(self, info: VideoInfo) -> int:
        """Index of the largest bucket ``info`` fits (see module docstring)."""
        long_enough = [i for i, b in enumerate(self.buckets) if self.frames_fit(b, info)]
        if not long_enough:
            need = min(self.buckets, key=lambda b: b.num_frames)
            unit = f"at {self.fps:g} fps" if self.fps is not None else f"stride {self.frame_stride}"
            raise NoBucket("too_short", f"{info.num_frames} frames ({info.span:.2f} s) cannot give "
                           f"{need.num_frames} frames {unit}")
        fits = [i for i in long_enough if self.upscale or (
            info.height >= self.buckets[i].height and info.width >= self.buckets[i].width)]
        if not fits:
            raise NoBucket("too_small", f"{info.height}x{info.width} is smaller than every bucket "
                           f"long enough for it (upscale=False)")
        aspect = math.log(max(info.height, 1) / max(info.width, 1))

        def rank(i: int) -> tuple:
            b = self.buckets[i]
            return (-b.tokens, abs(math.log(b.height / b.width) - aspect), i)

        return min(fits, key=rank)
