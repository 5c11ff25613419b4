"""What controls a dataset carries, recorded at write time so a run can check its model
against the data before any worker starts.

Every writer of shards (``worldline-shards``, the synthetic world) adds per sample
``controls``: ``{"action_slots": S, "action_min": a, "action_max": b}`` for discrete
actions ``[T, S]`` (absent without actions), ``"camera": true`` when the sample has a
camera path, ``"refs": n`` reference images. ``write_manifest`` sums them into the
manifest's ``controls``::

    {"samples": 120, "actions": {"samples": 120, "slots": [3], "min": 0, "max": 4},
     "camera": 120, "refs": 0}

``train/validate.py`` compares that with ``model.dit.num_action_slots`` / ``num_actions``
(an id out of range would index another slot's embedding rows; a slot count that differs
crashes at step 1) and with ``stage.conditions``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["sample_controls", "summarize_controls"]


def sample_controls(record: dict[str, Any], num_refs: int = 0) -> dict[str, Any]:
    """The ``controls`` facts of one sample's JSON record (``actions``, ``camera``)."""
    out: dict[str, Any] = {}
    if not isinstance(record, dict):  # a raw writer's hostile JSON: the loader skips it
        return out
    actions = record.get("actions")
    if actions is not None:
        try:
            a = np.asarray(actions)
        except ValueError:  # ragged
            a = np.zeros((0, 0))
        if a.ndim == 2 and a.size and np.issubdtype(a.dtype, np.integer):
            out.update(action_slots=int(a.shape[1]), action_min=int(a.min()),
                       action_max=int(a.max()))
    if record.get("camera") is not None:
        out["camera"] = True
    if num_refs:
        out["refs"] = int(num_refs)
    return out


def summarize_controls(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The manifest's ``controls`` from per-sample entries; None when no entry records them
    (a manifest written before this existed: nothing to check against)."""
    facts = [e["controls"] for e in entries if isinstance(e.get("controls"), dict)]
    if not facts:
        return None
    acted = [f for f in facts if "action_slots" in f]
    out: dict[str, Any] = {"samples": len(facts), "camera": sum(1 for f in facts if f.get("camera")),
                           "refs": max((int(f.get("refs", 0)) for f in facts), default=0)}
    if acted:
        out["actions"] = {"samples": len(acted),
                          "slots": sorted({int(f["action_slots"]) for f in acted}),
                          "min": min(int(f["action_min"]) for f in acted),
                          "max": max(int(f["action_max"]) for f in acted)}
    return out
