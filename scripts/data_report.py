"""``worldline-data report <shards|run>``: the licence / source table of a dataset or a run.

- a dataset folder (or its ``manifest.json``) from ``worldline-shards``: samples per licence
  and per source origin as ingested, how many lack a licence, what was skipped and why;
- a run dir, its ``checkpoints/`` dir, a ``step_<N>`` checkpoint or an export folder: the
  samples training actually *consumed* up to that checkpoint (exact across resumes and
  world-size changes; see ``worldline.data.provenance``).

Examples::

    worldline-data report /data/shards
    worldline-data report runs/world            # latest checkpoint
    worldline-data report runs/world --json     # the summary as JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summary_of(target: str | Path) -> tuple[str, dict]:
    """``(what, summary)`` for a dataset folder / manifest or a run / checkpoint / export."""
    from worldline.data.provenance import summarize_manifest

    path = Path(target)
    manifest = path if path.name == "manifest.json" else path / "manifest.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        summary = m.get("provenance") or summarize_manifest(m.get("samples", []), m.get("skipped", []))
        return f"dataset {manifest.parent}", summary
    from worldline.train.checkpoint import read_provenance, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    return f"checkpoint {ckpt} (samples consumed)", read_provenance(ckpt)


def main(argv: list[str] | None = None) -> int:
    """``worldline-data report TARGET [--json]``; prints the tables, exit 2 on a bad target."""
    from worldline.data.provenance import table

    ap = argparse.ArgumentParser(prog="worldline-data", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="licence / source table of shards or a run")
    rep.add_argument("target", help="dataset folder (manifest.json), run dir or checkpoint")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    try:
        what, summary = summary_of(args.target)
    except (FileNotFoundError, ValueError) as e:
        print(f"worldline-data: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=True))
        return 0
    skipped = summary.get("skipped", {})
    print(f"{what}: {summary.get('samples', 0)} samples, {summary.get('unlicensed', 0)} without "
          f"a licence, {skipped.get('opted_out', 0)} opted out\n")
    print(table(summary))
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
