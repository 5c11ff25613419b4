"""``worldline-export`` and ``worldline-lora``: command lines over
:mod:`worldline.train.weights` and :mod:`worldline.train.pipeline_io`.

``worldline-export`` turns any backend's checkpoint into consolidated safetensors +
config.json (one process, no process group; DeepSpeed through ``zero_to_fp32``), or with
``--pipeline`` into a WorldPipeline folder (``model_index.json`` + one folder per model).
``worldline-lora`` writes a LoRA run's adapter in PEFT's layout (``PeftModel.from_pretrained``
loads it onto ``<out>/base``), optionally diffusers' (Wan DiTs), and ``base/`` + ``merged/``
pipeline folders; see :mod:`worldline.train.lora_export`.

Every export also writes ``provenance.json`` and ``DATA_CARD.md`` next to the weights: the
samples the checkpoint's training consumed, per licence and per source (``worldline.data.provenance``).

Examples::

    worldline-export runs/world --out runs/world/export
    worldline-export runs/world --out runs/world/pipeline --pipeline
    worldline-export runs/wan-studio --out exports/wan --format diffusers   # a WanPipeline
    worldline-lora runs/studio-lora --out runs/studio-lora/export
"""
from __future__ import annotations

import argparse
from pathlib import Path


def write_provenance(checkpoint: str, out: str | Path) -> Path:
    """``provenance.json`` + ``DATA_CARD.md`` in ``out`` for the checkpoint ``checkpoint``
    (a run dir, its checkpoints/ dir or a step dir) was resolved to; returns the card."""
    from worldline.data.provenance import write_data_card
    from worldline.train.checkpoint import read_provenance, resolve_checkpoint

    ckpt = resolve_checkpoint(checkpoint)
    summary = {**read_provenance(ckpt), "checkpoint": str(ckpt)}
    return write_data_card(out, summary, title=Path(out).resolve().name)


def main(argv: list[str] | None = None) -> None:
    """``worldline-export <run or checkpoint> --out DIR [--pipeline] [--raw]``."""
    ap = argparse.ArgumentParser(prog="worldline-export",
                                 description="checkpoint -> safetensors export folder")
    ap.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a step_<N> dir")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--pipeline", action="store_true",
                    help="write a WorldPipeline folder (model_index.json + components)")
    ap.add_argument("--raw", action="store_true", help="--pipeline: raw weights, not EMA")
    ap.add_argument("--format", choices=("worldline", "diffusers"), default="worldline",
                    help="diffusers: a WanPipeline folder (Wan-architecture runs with a Wan "
                         "VAE and a transformers text encoder)")
    args = ap.parse_args(argv)
    if args.format == "diffusers":
        import sys

        from worldline.train.diffusers_export import export_wan_pipeline

        try:
            out = export_wan_pipeline(args.checkpoint, args.out, use_ema=not args.raw)
        except (ValueError, FileNotFoundError) as e:
            print(f"worldline-export: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    elif args.pipeline:
        from worldline.train.pipeline import WorldPipeline

        out = WorldPipeline.from_pretrained(args.checkpoint, use_ema=not args.raw) \
            .save_pretrained(args.out)
    else:
        from worldline.train.weights import export

        out = export(args.checkpoint, args.out)
    write_provenance(args.checkpoint, args.out)
    print(out)


def lora_main(argv: list[str] | None = None) -> None:
    """``worldline-lora <run or checkpoint> --out DIR [--format peft|diffusers|both]``."""
    from worldline.train.lora_export import FORMATS, export_lora

    ap = argparse.ArgumentParser(prog="worldline-lora",
                                 description="export a LoRA run: PEFT adapter + base/ + merged/")
    ap.add_argument("checkpoint", help="LoRA run dir, its checkpoints/ dir, or a step_<N> dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    ap.add_argument("--format", choices=FORMATS, default="peft",
                    help="adapter layout: PEFT (adapter_model.safetensors), diffusers "
                         "(pytorch_lora_weights.safetensors; Wan-architecture DiTs only) or both")
    args = ap.parse_args(argv)
    try:
        print(export_lora(args.checkpoint, args.out, use_ema=not args.raw, fmt=args.format))
        write_provenance(args.checkpoint, args.out)
    except ValueError as e:  # a user error (not a LoRA run, wrong format): one line, no trace
        ap.exit(2, f"worldline-lora: error: {e}\n")


if __name__ == "__main__":
    main()
