"""Provenance and consent: where each clip came from, under what licence, and opt-outs.

Ingest (``worldline-shards``) records per sample, in the sample JSON's ``provenance``::

    {"source": "https://studio.example/a.mp4", "license": "CC-BY-4.0",
     "attribution": "Jane Doe", "origin": "https://studio.example", "sha256": "<hex>"}

- ``license``, ``source``, ``attribution``, ``origin``: a manifest column (CSV/JSONL) or the
  same field of the ``<stem>.json`` sidecar, else the text sidecars ``<stem>.license.txt`` /
  ``<stem>.attribution.txt`` (first non-empty line of the licence file: an id such as an
  SPDX name, not a licence text), else ``--default-license`` / ``--default-source``.
  ``source`` falls back to the file's absolute path.
- ``origin`` is what counters group by (one row per collection, not one per clip):
  the explicit field, else ``scheme://host`` of a URL source, else ``--default-source``,
  else the name of the folder the file sits in.
- ``sha256``: of the original file, before any re-encode; exact duplicates are dropped.

Opt-out list (``--exclude FILE`` at ingest, ``data.exclude=FILE`` at training): a text file
(one entry a line, ``#`` comments) or JSON (a list, or ``{"sha256": [...], "sources": [...],
"keys": [...]}``). An entry of 64 hex digits is a content hash; anything else is matched
against a sample's ``source`` (path or URL, relative paths also as absolute) and its key.

Counting: the loader counts every *delivered* sample under ``stats["licenses"]`` and
``stats["sources"]`` (by origin), kept in its checkpointed state; :func:`summarize_states`
merges all ranks' states into the summary checkpoints (``provenance.json``) and exports
(``provenance.json`` + ``DATA_CARD.md``, :func:`write_data_card`) carry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["FIELDS", "UNKNOWN", "OptOut", "ProvenanceOptions", "count_labels", "describe",
           "IngestScreen", "label", "summarize_manifest", "summarize_states", "table", "write_data_card"]

FIELDS = ("source", "license", "attribution", "origin")
UNKNOWN = "unknown"  # counter name for samples without a licence / origin
_MAX_CHARS = 2000  # a provenance field longer than this is hostile, not a licence
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
# Distinct licence / origin names a loader counts before folding the rest into OTHER: hostile
# or per-clip origins must not grow the checkpointed state with every sample.
MAX_NAMES = 1024
_LABEL_CHARS = 200
OTHER = "other (too many distinct names)"


@dataclass(frozen=True)
class ProvenanceOptions:
    """Ingest defaults for samples whose sidecars / manifest row say nothing."""

    default_license: str | None = None
    default_source: str | None = None
    require_license: bool = False  # refuse (skip as ``no_license``) samples without one


def _is_url(text: str) -> bool:
    parts = urlsplit(text)
    return bool(parts.scheme) and len(parts.scheme) > 1 and bool(parts.netloc)


def _text_sidecar(video: str, suffix: str, first_line: bool) -> str | None:
    path = Path(video).with_suffix(suffix)
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if first_line:
        text = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return text or None


def _clean(name: str, value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    text = str(value).strip()
    if len(text) > _MAX_CHARS:
        raise ValueError(f"{name} is {len(text)} characters (more than {_MAX_CHARS})")
    return text or None


def describe(video: str, meta: dict, sha256: str, opts: ProvenanceOptions) -> dict:
    """The ``provenance`` record of one input (module docstring for the precedence).

    ``meta`` is the merged sidecar JSON + manifest columns; the provenance fields are popped
    from it so they are stored once. ``ValueError`` on a non-string or absurdly long field
    (ingest turns it into a ``bad_provenance`` skip)."""
    given = {k: _clean(k, meta.pop(k, None)) for k in FIELDS}
    try:
        if given["license"] is None:
            given["license"] = _clean("license", _text_sidecar(video, ".license.txt", True))
        if given["attribution"] is None:
            given["attribution"] = _clean("attribution", _text_sidecar(video, ".attribution.txt", False))
    except OSError as exc:
        raise ValueError(f"unreadable licence sidecar: {exc}") from None
    source = given["source"] or opts.default_source or str(Path(video).resolve())
    origin = given["origin"]
    if origin is None:
        if _is_url(source):
            parts = urlsplit(source)
            origin = f"{parts.scheme}://{parts.netloc}"
        else:
            origin = opts.default_source or Path(video).resolve().parent.name or UNKNOWN
    return {"source": source, "license": given["license"] or opts.default_license,
            "attribution": given["attribution"], "origin": origin, "sha256": sha256}


def label(sample_json: Mapping) -> tuple[str, str]:
    """``(license, origin)`` a delivered sample is counted under (``"unknown"`` for shards
    written without provenance, e.g. the synthetic world)."""
    prov = sample_json.get("provenance") if isinstance(sample_json, Mapping) else None
    prov = prov if isinstance(prov, Mapping) else {}
    lic, origin = prov.get("license"), prov.get("origin")
    return (lic[:_LABEL_CHARS] if isinstance(lic, str) and lic else UNKNOWN,
            origin[:_LABEL_CHARS] if isinstance(origin, str) and origin else UNKNOWN)


def count_labels(stats: dict, labels: Iterable[tuple[str, str]]) -> None:
    """Add delivered samples' labels to a loader ``stats`` dict (``licenses``, ``sources``)."""
    licenses = stats.setdefault("licenses", {})
    sources = stats.setdefault("sources", {})
    for lic, origin in labels:
        for table, name in ((licenses, lic), (sources, origin)):
            if name not in table and len(table) >= MAX_NAMES:
                name = OTHER  # exact totals still; the long tail is one row
            table[name] = table.get(name, 0) + 1


class OptOut:
    """A rights holders' opt-out list (module docstring for the file format)."""

    def __init__(self, entries: Iterable[str], path: str | None = None):
        self.path = path
        self.hashes: set[str] = set()
        self.names: set[str] = set()  # sources (paths / URLs) and keys
        for entry in entries:
            entry = str(entry).strip()
            if not entry:
                continue
            if _HEX64.match(entry):
                self.hashes.add(entry.lower())
                continue
            self.names.add(entry)
            if "/" in entry and not _is_url(entry):  # a path: also as an absolute path
                self.names.add(os.path.abspath(entry))

    @classmethod
    def load(cls, path: str | os.PathLike) -> OptOut:
        """Read an opt-out file: JSON (list or ``{"sha256"/"sources"/"keys": [...]}``) or text."""
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = json.loads(text) if text.lstrip().startswith(("[", "{")) else None
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{path}: not an opt-out list: {type(exc).__name__}: {exc}") from None
        if data is not None:
            if isinstance(data, dict):
                lists = [data.get(k) or [] for k in ("sha256", "sources", "keys")]
                data = [v for x in lists for v in x] if all(isinstance(x, list) for x in lists) else None
            if not isinstance(data, list):
                raise ValueError(f"{path}: opt-out JSON must be a list or an object of lists")
            entries = [str(v) for v in data]
        else:
            # "#" starts a comment at a line's start or after a space (URLs keep fragments).
            entries = [re.split(r"(?:^|\s)#", ln, maxsplit=1)[0] for ln in text.splitlines()]
        return cls(entries, str(path))

    def __len__(self) -> int:
        return len(self.hashes) + len(self.names)

    def match(self, key: str, sample_json: Mapping | None = None, source: str | None = None,
              sha256: str | None = None) -> str | None:
        """The entry that opts this sample out (its content hash, source or key), or None.
        ``sample_json``: the stored sample JSON (its ``provenance`` and ``meta.source``)."""
        prov = (sample_json or {}).get("provenance") if isinstance(sample_json, Mapping) else None
        prov = prov if isinstance(prov, Mapping) else {}
        meta = (sample_json or {}).get("meta") if isinstance(sample_json, Mapping) else None
        meta = meta if isinstance(meta, Mapping) else {}
        digest = sha256 or prov.get("sha256")
        if isinstance(digest, str) and digest.lower() in self.hashes:
            return f"sha256 {digest.lower()}"
        for name in (source, prov.get("source"), meta.get("source"), key):
            if isinstance(name, str) and name in self.names:
                return name
        return None


def _add(into: dict, counts: Mapping) -> None:
    for name, n in counts.items():
        into[name] = into.get(name, 0) + int(n)


def _loader_stats(state: Mapping) -> list[Mapping]:
    """The ShardLoader stats inside one rank's data state (a StageLoader nests its loaders)."""
    if not isinstance(state, Mapping):
        return []
    if "stats" in state:
        return [state["stats"]]
    nested = [state.get(k) for k in ("main", "prior")]
    return [s for sub in nested if isinstance(sub, Mapping) for s in _loader_stats(sub)]


def summarize_states(states: Iterable[Mapping]) -> dict:
    """Provenance of the samples consumed, from every rank's loader state (the counts are
    exact: they advance only when the consumer receives a batch). Identical states (ranks of
    one context-parallel group share theirs) count once."""
    seen: set[str] = set()
    out: dict = {"samples": 0, "licenses": {}, "sources": {}, "skipped": {}}
    for state in states:
        blob = json.dumps(state, sort_keys=True)
        if blob in seen:
            continue
        seen.add(blob)
        for stats in _loader_stats(state):
            out["samples"] += int(stats.get("samples", 0))
            _add(out["licenses"], stats.get("licenses", {}))
            _add(out["sources"], stats.get("sources", {}))
            _add(out["skipped"], stats.get("skipped_reasons", {}))
    out["unlicensed"] = out["licenses"].get(UNKNOWN, 0)
    return out


def summarize_manifest(entries: Iterable[Mapping], skipped: Iterable[Mapping]) -> dict:
    """Dataset-level provenance for ``manifest.json``: samples per licence and per origin,
    how many lack a licence, and the skipped inputs per reason."""
    out: dict = {"samples": 0, "licenses": {}, "sources": {}, "skipped": {}}
    for e in entries:
        lic, origin = label({"provenance": e.get("provenance")})
        out["samples"] += 1
        _add(out["licenses"], {lic: 1})
        _add(out["sources"], {origin: 1})
    for b in skipped:
        _add(out["skipped"], {b.get("reason", UNKNOWN): 1})
    out["unlicensed"] = out["licenses"].get(UNKNOWN, 0)
    return out


def table(summary: Mapping) -> str:
    """The licence and source tables of a summary, as Markdown."""
    n = max(1, int(summary.get("samples", 0)))
    lines = []
    for title, name in (("licenses", "Licence"), ("sources", "Source (origin)")):
        lines += [f"| {name} | Samples | Share |", "|---|---:|---:|"]
        for k, v in sorted(summary.get(title, {}).items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"| {k.replace('|', '/')} | {v} | {100 * v / n:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def write_data_card(out_dir: str | os.PathLike, summary: Mapping, title: str = "model") -> Path:
    """Write ``provenance.json`` (the summary as is) and a human-readable ``DATA_CARD.md``
    next to exported weights; returns the card's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "provenance.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
    skipped = summary.get("skipped", {})
    card = [
        f"# Data card: {title}", "",
        f"Training samples consumed: **{summary.get('samples', 0)}** "
        f"(counted by the data loader as each batch reached the trainer; exact across "
        f"resumes and world-size changes).", "",
        f"Samples without a recorded licence: **{summary.get('unlicensed', 0)}**. "
        f"Opt-out list hits: **{skipped.get('opted_out', 0)}** (skips, never trained on; an "
        f"opted-out clip is skipped again each epoch it comes up).", "",
        table(summary),
        "Skipped samples by reason: " + (", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"),
        "", "Per-clip provenance (source, licence, attribution, sha256) is in each sample's "
        "JSON and the dataset's manifest.json.", "",
    ]
    for k in ("step", "checkpoint"):
        if k in summary:
            card.append(f"- {k}: {summary[k]}")
    path = out / "DATA_CARD.md"
    path.write_text("\n".join(card) + "\n")
    return path


class IngestScreen:
    """Ingest-time consent and de-duplication, run in input order by the shard writer: an
    input whose hash, source or key is on the opt-out list is ``opted_out``; a second input
    with the same content hash as an earlier one is ``duplicate`` (naming both)."""

    def __init__(self, exclude: OptOut | None = None, kept: Iterable[Mapping] = ()):
        self.exclude = exclude
        # sha256 -> (key, source) of the first copy; ``kept``: manifest entries of a resumed run.
        self.first: dict[str, tuple[str, str]] = {}
        for e in kept:
            prov = e.get("provenance") or {}
            if prov.get("sha256"):
                self.first.setdefault(prov["sha256"], (e["key"], str(prov.get("source"))))

    def check(self, key: str, path: str, prov: Mapping) -> tuple[str, str] | None:
        """``(reason, message)`` if the input must be skipped, else None (and it is now the
        first copy of its content)."""
        sha = prov.get("sha256")
        if self.exclude is not None:
            hit = self.exclude.match(key, source=prov.get("source"), sha256=sha) or \
                self.exclude.match(key, source=path)
            if hit:
                return "opted_out", f"{path}: on the opt-out list {self.exclude.path} ({hit})"
        if sha in self.first:
            other, source = self.first[sha]
            return "duplicate", (f"{path} (key {key}) has the same content (sha256 {sha[:16]}...) "
                                 f"as {source} (key {other}), kept")
        if sha:
            self.first[sha] = (key, str(prov.get("source")))
        return None
