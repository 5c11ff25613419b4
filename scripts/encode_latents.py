"""Encode pixel shards once into latent shards with a trained Worldline autoencoder or a
pretrained diffusers VAE (``--vae``), and optionally cache caption embeddings of a
pretrained text encoder (``--text-encoder``).

Example (tiny, CPU)::

    python -m worldline.scripts.encode_latents runs/_datasets/synthetic-xxx /data/latents \\
        --checkpoint runs/quickstart-autoencoder --num-frames 17 --resolution 64 64

Loads ``VideoAutoencoder`` from a run dir or checkpoint dir (its EMA weights when saved; the
frozen ``autoencoder`` of a later stage's checkpoint works too) and writes latent shards that
``ShardLoader(out, input="latent")`` streams (``data.input=latent``). Stored latents are the
posterior *mean*, not normalised: the trainer applies ``autoencoder.normalize`` as it does
for on-the-fly encoding. This is the one script that imports models/; data/ only ever sees
the ``encode`` callable.

Across GPUs and nodes: start it under ``torchrun --nproc_per_node=8 ...`` or one ``srun`` task
per GPU. Rank ``r`` of ``W`` encodes input shards ``r::W`` on its local GPU (gloo on CPU) into
latent shards named like their input shards, so ranks never share a file; after a barrier
rank 0 writes the one ``manifest.json`` from every rank's journal. The result equals a
one-process run's (clip windows are drawn per input shard, not per rank), and a rerun with
the same world size resumes each rank's journal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch


def load_autoencoder(checkpoint: str, device: str = "cpu") -> torch.nn.Module:
    """A frozen ``VideoAutoencoder`` from a Worldline run or checkpoint directory."""
    from worldline.train.pipeline_io import load_autoencoder as load

    return load(checkpoint)[0].to(device)


def _encoders(args: argparse.Namespace) -> tuple[torch.nn.Module, object, dict]:
    """(autoencoder, text encode callable or None, provenance for the manifest)."""
    from worldline.models.adapters import (
        DiffusersVideoVAE,
        HFTextEncoder,
        folder_fingerprint,
        is_diffusers_vae_folder,
    )

    if args.checkpoint and is_diffusers_vae_folder(args.checkpoint):
        args.vae, args.checkpoint = args.checkpoint, None  # a diffusers folder given as such
    if bool(args.checkpoint) == bool(args.vae):
        raise SystemExit("worldline-encode-latents: give exactly one of --checkpoint "
                         "(a Worldline autoencoder run) or --vae (a diffusers VAE folder)")
    provenance: dict = {}
    if args.vae:
        ae = DiffusersVideoVAE.from_pretrained(args.vae).to(args.device)
        provenance["autoencoder"] = {**folder_fingerprint(args.vae), "class": ae.family}
    else:
        ae = load_autoencoder(args.checkpoint, args.device)
        provenance["autoencoder"] = {"checkpoint": str(args.checkpoint)}
    text = None
    if args.text_encoder:
        enc = HFTextEncoder.from_pretrained(args.text_encoder, max_len=args.text_max_len,
                                            tokenizer=args.tokenizer,
                                            hidden_state=args.hidden_state).to(args.device)
        provenance["text_encoder"] = {
            **folder_fingerprint(args.text_encoder), "max_len": args.text_max_len,
            "hidden_state": args.hidden_state, "dim": enc.dim,
            "tokenizer": str(args.tokenizer) if args.tokenizer else None}
        text = enc
    return ae, text, provenance


def autoencoder_encoder(ae: torch.nn.Module, device: str = "cpu"):
    """``encode(video_u8 [B, 3, T, H, W]) -> posterior mean [B, C, t, h, w]``."""

    @torch.no_grad()
    def encode(video_u8: torch.Tensor) -> torch.Tensor:
        x = video_u8.to(device).float().div_(127.5).sub_(1.0)  # same as training's to_unit_range
        mean, _ = ae.encode(x)
        return mean

    return encode


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="worldline-encode-latents", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", help="pixel shards: dataset dir, manifest.json, brace pattern or list")
    p.add_argument("out", help="output folder for latent shards")
    p.add_argument("--checkpoint", help="Worldline autoencoder run dir or checkpoint dir")
    p.add_argument("--vae", help="or: a local diffusers video VAE folder (Wan, HunyuanVideo, "
                   "LTX); latents are stored raw, normalised at training time")
    p.add_argument("--text-encoder", help="a local transformers text encoder folder: cache "
                   "caption embeddings + masks (its fingerprint goes into the manifest)")
    p.add_argument("--tokenizer", help="tokenizer folder when not inside --text-encoder")
    p.add_argument("--text-max-len", type=int, default=226, help="tokens per caption")
    p.add_argument("--hidden-state", type=int, default=-1, help="encoder layer (-1: last)")
    p.add_argument("--num-frames", type=int, default=17)
    p.add_argument("--frame-stride", type=int, default=1)
    p.add_argument("--fps", type=float, help="sample at this frame rate instead of a stride")
    p.add_argument("--resolution", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--position", choices=("start", "center", "random"), default="start")
    p.add_argument("--crop", choices=("center", "random"), default="center")
    p.add_argument("--max-crop", type=float, default=0.25,
                   help="most a crop may remove of a side; beyond it the clip is letterboxed (data.max_crop)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio-rate", type=int, default=0,
                   help="also store each clip's mono audio window at this rate (Hz); 0: none")
    p.add_argument("--overwrite", action="store_true", help="start over instead of resuming")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from worldline.train.dist import dist_env, run_and_finish

    if dist_env().distributed:  # torchrun / srun: every rank encodes its shards
        run_and_finish(lambda: _encode(args))  # barrier, destroy, flush, os._exit: never returns
    return _encode(args)


def _encode(args: argparse.Namespace) -> int:
    """Encode (this rank's share of) the shards; under several ranks, rank 0 writes the
    manifest once every rank is done."""
    import torch.distributed as dist

    from worldline.data.latents import encode_latent_shards, write_latent_manifest
    from worldline.train.dist import init_distributed, pick_device

    info = init_distributed()
    if info.distributed and args.device == "cuda":
        args.device = str(pick_device())  # this rank's local GPU

    try:
        ae, text, provenance = _encoders(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"worldline-encode-latents: error: {e}", file=sys.stderr)
        return 2
    manifest = encode_latent_shards(
        args.shards, args.out, autoencoder_encoder(ae, args.device), num_frames=args.num_frames,
        frame_stride=args.frame_stride, fps=args.fps, resolution=tuple(args.resolution),
        position=args.position, crop=args.crop, max_crop=args.max_crop, batch_size=args.batch_size, dtype=args.dtype,
        num_workers=args.workers, seed=args.seed, resume=not args.overwrite,
        text_encode=text, provenance=provenance, audio_rate=args.audio_rate,
        rank=info.rank, world_size=info.world_size,
    )
    if info.distributed:
        dist.barrier()  # every rank's shards and journal are on disk
        if info.rank != 0:
            return 0
        manifest = write_latent_manifest(args.out, info.world_size)
    print(json.dumps({"out": args.out, "shards": len(manifest["shards"]), "samples": manifest["num_samples"],
                      "latent_shape": manifest["latent_shape"], "skipped": manifest["skipped_reasons"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
