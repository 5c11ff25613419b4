"""worldline.data: bytes on disk -> batches.

- ``video``: mp4 encode (PyAV) / decode (decord; frame-exact PyAV ``ExactReader`` for open-GOP
  streams), clip sampling, uint8 resize/crop, previews;
- ``probe``: decode-free container-header facts (rate, VFR, open GOP from timestamps) and limits;
- ``synthetic``: the procedural world used as the embedded default dataset;
- ``sources`` + ``ingest``: folder / CSV / JSONL of videos -> validated shards (``worldline-shards``);
- ``shards``: the one shard writer (rolling tar shards, resume journal, manifest),
  ``write_shards``, ``ensure_synthetic_dataset``; ``atomic``: temp file + fsync + rename;
- ``samples``: tar members -> validated samples -> decoded clips -> batches (safe by design);
- ``buckets``: resolution x frame-count buckets with per-bucket batch sizes;
- ``batch``: ``Batch``, the typed batch (readable as a mapping);
- ``state`` + ``streams`` + ``loader``: ``ShardLoader``, streaming batches with exact resume
  (``streams`` runs one sub-stream from a ``StreamPlan``; it never sees the loader);
- ``stage_loader``: ``StageLoader``, phase schedules and prior-preservation mixing of loaders;
- ``latents``: encode shards once into latent shards, stream them back.

Importing this package is cheap: names below resolve lazily (PEP 562), so ``import
worldline.data`` does not pull in torch, decord or PyAV.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "encode_mp4": "video",
    "decode_clip": "video",
    "resize_crop": "video",
    "write_mp4": "video",
    "write_contact_sheet": "video",
    "probe_video": "probe",
    "VideoLimits": "probe",
    "SyntheticWorldConfig": "synthetic",
    "render_clip": "synthetic",
    "ACTION_NAMES": "synthetic",
    "NUM_ACTIONS": "synthetic",
    "write_shards": "shards",
    "ensure_synthetic_dataset": "shards",
    "make_shards": "ingest",
    "IngestOptions": "ingest",
    "Bucket": "buckets",
    "buckets_for_budget": "buckets",
    "Batch": "batch",
    "StageLoader": "stage_loader",
    "ShardLoader": "loader",
    "resolve_shards": "loader",
    "encode_latent_shards": "latents",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
