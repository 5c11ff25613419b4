"""``worldline-shards``: a folder or CSV/JSONL manifest of videos -> WebDataset tar shards.

Examples (tiny, CPU)::

    worldline-shards clips/ /data/shards --max-count 256 --processes 4
    worldline-shards clips.csv /data/shards --max-size 1GB --reencode libx264 --max-side 512
    # an interrupted run continues where it stopped when re-run with the same arguments;
    # a rerun on a finished output says "nothing new", or appends new / changed inputs
    worldline-shards clips/ /data/shards --num-actions 8 --max-input-size 2GiB
    # past one machine: 2 partition tasks (any hosts sharing /data), then one merge
    worldline-shards clips/ /data/shards --partitions 2 --partition 0   # and --partition 1
    worldline-shards clips/ /data/shards --partitions 2 --merge
    # the same as a SLURM array (submitit) + a merge job that waits for it
    worldline-shards clips/ /data/shards --partitions 64 --slurm --slurm-partition cpu

Writes ``shard-000000.tar ...`` and ``manifest.json`` (per-shard sample counts and bytes, and
per sample: resolution, fps, frame count, duration). Every path under the source is either
ingested or skipped and listed (path, reason: bad inputs, hidden files, broken symlinks,
unused files, ...) on stderr and in ``manifest["skipped"]``; the exit code is 0 unless the run itself
fails (or ``--strict`` and something was skipped). Licences and sources
(``--default-license``, ``--default-source``, ``--require-license``), exact de-duplication and
an opt-out list (``--exclude``): ``worldline.data.provenance``. Input layout, sidecars and the sample
format: ``worldline.data.sources`` and ``worldline.data.ingest``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

from worldline.data.ingest import IngestOptions, make_shards
from worldline.data.probe import VideoLimits
from worldline.data.provenance import OptOut, ProvenanceOptions
from worldline.data.rerun import describe
from worldline.data.transcode import check_encoder

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12}


def parse_size(text: str) -> int:
    """``"512MB"`` -> 512000000, ``"1GiB"`` -> 1073741824, ``"4096"`` -> 4096."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4096, 500MB, 1GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def video_encoder(name: str) -> str:
    """``--reencode``'s type: an encoder whose mp4 output the loader decodes, checked before any
    work starts (an unknown name used to skip every input and exit 0)."""
    try:
        return check_encoder(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worldline-shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder of videos (+ sidecars) or a .csv / .jsonl manifest")
    p.add_argument("out", help="output folder for shards and manifest.json")
    p.add_argument("--max-count", type=int, help="samples per shard")
    p.add_argument("--max-size", type=parse_size, help="target bytes per shard (e.g. 1GB)")
    p.add_argument("--pattern", default="shard-{:06d}.tar", help="shard file name pattern")
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="worker processes")
    p.add_argument("--validate", choices=("fast", "full"), default="fast",
                   help="decode first + last frame (fast) or every frame (full)")
    p.add_argument("--reencode", metavar="CODEC", type=video_encoder,
                   help="re-encode every video with this encoder (e.g. libx264; checked first)")
    p.add_argument("--max-side", type=int, help="downscale so the longer side is <= this (re-encodes)")
    p.add_argument("--crf", type=int, default=20, help="quality when re-encoding")
    p.add_argument("--max-video-side", type=int, default=VideoLimits.max_side,
                   help="reject videos whose header declares a larger side")
    p.add_argument("--max-video-pixels", type=int, default=VideoLimits.max_pixels,
                   help="reject videos whose header declares more pixels per frame")
    p.add_argument("--max-input-size", type=parse_size, default=IngestOptions.max_input_bytes,
                   help="skip input videos larger than this, unread (default 4GiB)")
    p.add_argument("--max-sidecar-size", type=parse_size, default=IngestOptions.max_sidecar_bytes,
                   help="skip inputs whose JSON / .npy / reference sidecar is larger (default 64MiB)")
    p.add_argument("--num-actions", type=int, default=0,
                   help="action ids must lie in [0, N) (the model's model.dit.num_actions); 0: unchecked")
    p.add_argument("--source-root", help="a .csv/.jsonl manifest may only name files under "
                   "this folder (default: anywhere)")
    p.add_argument("--default-license", metavar="ID",
                   help="licence of inputs whose sidecars / manifest row name none (e.g. CC-BY-4.0)")
    p.add_argument("--default-source", metavar="URL",
                   help="source (and counted origin) of inputs that name none (default: the file path)")
    p.add_argument("--require-license", action="store_true",
                   help="skip inputs without a licence (reason no_license) instead of counting them")
    p.add_argument("--exclude", metavar="FILE", help="opt-out list: content sha256s, source "
                   "paths/URLs or keys, one a line (or JSON); matching inputs are skipped (opted_out)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete our shards and journal in OUT (needed when settings changed)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any input was skipped")
    p.add_argument("-q", "--quiet", action="store_true")
    scale = p.add_argument_group("scaling out (worldline.data.ingest_dist; SLURM: worldline.scripts.shards_slurm)")
    scale.add_argument("--partitions", type=int, metavar="N",
                       help="split the inputs into N contiguous partitions written to OUT/parts/part-<i>/")
    scale.add_argument("--partition", type=int, metavar="I",
                       help="write only partition I of --partitions (one task; idempotent, resumable)")
    scale.add_argument("--merge", action="store_true",
                       help="merge the N finished partitions into OUT (one numbered shard "
                            "sequence, one manifest.json)")
    scale.add_argument("--slurm", action="store_true",
                       help="submit the N partitions as a SLURM array job (submitit) and the "
                            "merge as a job depending on it; prints the job ids")
    scale.add_argument("--slurm-partition", help="SLURM partition of the jobs")
    scale.add_argument("--slurm-account", help="SLURM account")
    scale.add_argument("--slurm-time", type=int, default=1440, metavar="MIN",
                       help="time limit of each job in minutes")
    scale.add_argument("--slurm-cpus", type=int, default=8,
                       help="CPUs per partition task (its --processes unless given)")
    scale.add_argument("--slurm-parallelism", type=int, default=256,
                       help="partition tasks running at once")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    if args.max_count is None and args.max_size is None:
        args.max_count = 1000  # webdataset's usual granularity when nothing is asked for
    options = IngestOptions(validate=args.validate, reencode=args.reencode, max_side=args.max_side,
                            crf=args.crf, source_root=args.source_root, num_actions=args.num_actions,
                            limits=VideoLimits(max_side=args.max_video_side, max_pixels=args.max_video_pixels),
                            max_input_bytes=args.max_input_size, max_sidecar_bytes=args.max_sidecar_size,
                            provenance=ProvenanceOptions(args.default_license, args.default_source,
                                                         args.require_license))
    scaled = args.partition is not None or args.merge or args.slurm
    if scaled and not args.partitions:
        parser.error("--partition, --merge and --slurm need --partitions N")
    if args.partitions is not None and not (args.partitions >= 1 and 0 <= (args.partition or 0) < args.partitions):
        parser.error(f"need --partitions >= 1 and 0 <= --partition < {args.partitions}")
    if args.slurm:
        from worldline.scripts.shards_slurm import submit_partitions

        print(json.dumps(submit_partitions(argv if argv is not None else sys.argv[1:], args, main)))
        return 0
    exclude = OptOut.load(args.exclude) if args.exclude else None
    try:
        if args.merge:
            from worldline.data.ingest_dist import merge_parts

            manifest = merge_parts(args.out, args.partitions)
        elif args.partitions:
            from worldline.data.ingest_dist import make_partition, merge_parts

            todo = [args.partition] if args.partition is not None else range(args.partitions)
            for i in todo:  # without --partition: every partition here, then the merge
                manifest = make_partition(args.source, args.out, args.partitions, i,
                                          max_count=args.max_count, max_bytes=args.max_size,
                                          pattern=args.pattern, processes=args.processes,
                                          options=options, resume=not args.overwrite,
                                          exclude=exclude)
            if args.partition is None:
                manifest = merge_parts(args.out, args.partitions)
        else:
            manifest = make_shards(args.source, args.out, max_count=args.max_count, max_bytes=args.max_size,
                                   pattern=args.pattern, processes=args.processes, options=options,
                                   resume=not args.overwrite, exclude=exclude)
    except (ValueError, FileNotFoundError) as exc:  # other settings, a foreign folder, no source
        print(f"worldline-shards: {exc}", file=sys.stderr)
        return 2
    for bad in manifest["skipped"]:
        print(f"skipped {bad['path']}: {bad['reason']} {bad['message']}", file=sys.stderr)
    reasons: dict[str, int] = {}
    for bad in manifest["skipped"]:
        reasons[bad["reason"]] = reasons.get(bad["reason"], 0) + 1
    run = manifest.get("run") or {}
    if run:
        print(f"worldline-shards: {describe(run)}", file=sys.stderr)
    summary = {"out": os.path.abspath(args.out), "shards": len(manifest["shards"]),
               "samples": manifest["num_samples"], "skipped": len(manifest["skipped"]),
               "skipped_reasons": reasons, "pattern": manifest["pattern"], "run": run.get("action"),
               "unlicensed": manifest.get("provenance", {}).get("unlicensed", 0),
               "licenses": manifest.get("provenance", {}).get("licenses", {})}
    print(json.dumps(summary))
    return 1 if (args.strict and manifest["skipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
