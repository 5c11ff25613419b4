"""What a rerun of ``make_shards`` on a finished (or interrupted) output does, decided up front.

``make_shards`` journals, per closed shard, the entries it holds (each with its input's
``size``, ``mtime_ns`` and ``sha256``) and the inputs reported bad (with ``size`` and
``mtime_ns``). ``plan_rerun`` compares that with what ``discover`` lists now:

- an input whose size and mtime are unchanged is unchanged (no read); one whose size or mtime
  changed is hashed (streamed) and unchanged if its sha256 is (a ``touch``, a copy);
- a changed ingested input drops the journaled shards from the first one holding it onwards
  (their files are deleted): they are redone, with the new content, in the same order;
- a changed bad input is retried; a new input is appended after the kept shards;
- an input that is gone keeps its samples (sources deleted after sharding are normal) and is
  reported in ``gone``.

The returned ``summary`` says which it is: ``"nothing new"`` (the manifest stays as it was),
``"appended"`` (N new or changed inputs), or ``"resumed"`` (an interrupted run continues).
Settings that differ from the journal's are refused before this runs (``Journal.records``),
naming the ``--overwrite`` flag.
"""

from __future__ import annotations

import os

from worldline.data.sources import SourceItem, file_sha256


def stat_fingerprint(path: str) -> dict | None:
    """``{"size", "mtime_ns"}`` of ``path`` (``None`` if it cannot be stat'ed): the cheap half
    of an input's fingerprint, journaled for every input, good or bad."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _changed(path: str, old: dict | None) -> bool:
    """Whether ``path`` differs from its journaled fingerprint ``old`` (size + mtime, then
    sha256 when those moved). Entries journaled before fingerprints existed never change."""
    if not old:
        return False
    now = stat_fingerprint(path)
    if now is None:
        return False  # gone: reported separately, its samples kept
    if now["size"] == old.get("size") and now["mtime_ns"] == old.get("mtime_ns"):
        return False
    if now["size"] != old.get("size") or "sha256" not in old:
        return True
    try:
        return file_sha256(path) != old["sha256"]
    except OSError:
        return True


def plan_rerun(records: list[dict], items: list[SourceItem], complete: bool
               ) -> tuple[list[dict], list[SourceItem], dict]:
    """``(records to keep, items to do, summary)`` for a rerun over journal ``records``
    (``complete``: the previous run wrote its manifest). ``records`` entries that must be
    redone are removed from the returned list; the caller deletes their shard files."""
    live = {it.video: it for it in items if it.problem is None}
    first_dirty, changed, retried = len(records), set(), set()
    for i, record in enumerate(records):
        for entry in record["entries"]:
            source = entry.get("source")
            if source in live and _changed(source, entry.get("input")):
                first_dirty = min(first_dirty, i)
                changed.add(source)
    kept = [dict(r) for r in records[:first_dirty]]
    for record in kept:  # a bad input that changed since is tried again
        still = [b for b in record["bad"] if not (b.get("path") in live and _changed(b["path"], b.get("input")))]
        retried.update(b["path"] for b in record["bad"] if b not in still)
        record["bad"] = still
    known = {e.get("source") for r in records for e in r["entries"]} | {b.get("path") for r in records for b in r["bad"]}
    done = {e["key"] for r in kept for e in r["entries"]} | {b["key"] for r in kept for b in r["bad"]}
    todo = [it for it in items if it.key not in done]
    new = [it for it in todo if it.video not in known]
    listed = {it.video for it in items}
    gone = sorted(s for s in known if s is not None and s not in listed)
    redone = sum(1 for r in records[first_dirty:] if r.get("shard"))
    if not complete:
        action = "resumed"
    elif todo or len(kept) != len(records) or retried:
        action = "appended"
    else:
        action = "nothing new"
    summary = {"action": action, "new": len(new), "changed": len(changed), "retried": len(retried),
               "redone_shards": redone, "gone": gone}
    return kept, todo, summary


def describe(summary: dict) -> str:
    """One line for the log / CLI: what the rerun did."""
    if summary["action"] == "nothing new":
        text = "nothing new: every input is unchanged since the last run; manifest kept"
    elif summary["action"] == "fresh":
        text = f"new output: {summary['new']} inputs listed"
    else:
        text = (f"{summary['action']}: {summary['new']} new and {summary['changed']} changed inputs, "
                f"{summary['retried']} changed since they were skipped"
                + (f" ({summary['redone_shards']} shards from the first changed one redone)"
                   if summary["redone_shards"] else ""))
    if summary.get("gone"):
        text += f"; {len(summary['gone'])} inputs gone since (their samples kept; --overwrite drops them)"
    return text
