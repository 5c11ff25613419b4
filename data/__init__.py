"""worldline.data: bytes on disk -> batches.

- ``video``: mp4 encode (PyAV) / decode (decord), preview mp4 and contact sheets;
- ``synthetic``: the procedural world used as the embedded default dataset;
- ``shards``: WebDataset shard + manifest writing, ``ensure_synthetic_dataset``;
- ``loader``: ``ShardLoader``, streaming batches with exact resume.

Importing this package is cheap: names below resolve lazily (PEP 562), so ``import
worldline.data`` does not pull in torch, decord or PyAV.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "encode_mp4": "video",
    "decode_clip": "video",
    "write_mp4": "video",
    "write_contact_sheet": "video",
    "SyntheticWorldConfig": "synthetic",
    "render_clip": "synthetic",
    "ACTION_NAMES": "synthetic",
    "NUM_ACTIONS": "synthetic",
    "write_shards": "shards",
    "ensure_synthetic_dataset": "shards",
    "ShardLoader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
