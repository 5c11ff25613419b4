"""Latent caches: run a frozen encoder over pixel shards once, write latent shards.

Training should not run a frozen autoencoder every step when it can avoid it (encode once,
train many). ``encode_latent_shards`` reads pixel shards with the loader's own code path
(same validation, skipping and clip sampling), calls ``encode(video_u8 [B, 3, T, H, W]) ->
latents [B, C, t, h, w]`` (a plain callable, so data/ never imports models/) and writes one
latent shard per pixel shard, same name. Each sample is

- ``<key>.safetensors``: ``latents`` ``[C, t, h, w]`` (``dtype``), ``actions`` int64
  ``[T, S]``, ``camera`` float32 ``[T, 2]`` (the per-frame deltas the pixel loader yields),
  ``text_emb`` / ``text_mask`` when ``text_encode`` is given, and ``audio`` float32 ``[N]`` /
  ``audio_mask`` bool ``[N]`` with ``audio_rate > 0`` (the clip's audio window, as the pixel
  loader yields it; ``LatentCodec`` batches it back). safetensors is a JSON
  header plus raw buffers: loading it runs no code (unlike pickle).
- ``<key>.json`` (caption, style, source shard, clip settings) and ``<key>.txt`` (caption).

The clip is frozen at encoding time: ``position="random"`` draws one window per sample from
``seed`` and keeps it. ``manifest.json`` (``"input": "latent"``) lists shards, counts, the
latent shape and the clip settings; ``ShardLoader(out_dir, input="latent")`` streams it.
Interrupted runs resume: finished shards are journaled and kept.

Tiny CPU example::

    encode = lambda v: torch.nn.functional.avg_pool3d(v.float() / 127.5 - 1, (4, 8, 8))
    encode_latent_shards("/tmp/wl-data/synthetic-xxx", "/tmp/latents", encode,
                         num_frames=8, resolution=(64, 64), batch_size=4)
    batch = next(iter(ShardLoader("/tmp/latents", batch_size=2, input="latent")))
    # batch["latents"]: float16 [2, 3, 2, 8, 8]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from worldline.data.buckets import Bucket, BucketSet
from worldline.data.loader import _identity, resolve_shards
from worldline.data.samples import PixelCodec, Skip, iter_tar_samples
from worldline.data.atomic import TMP_MARK
from worldline.data.shards import Journal, TarShard, remove_partial_shards, write_manifest
from worldline.data.video import DEFAULT_MAX_CROP

log = logging.getLogger(__name__)

JOURNAL = ".encode_latents.journal.jsonl"
DTYPES = {"float16": np.float16, "float32": np.float32}


class _ShardSamples(IterableDataset):
    """Decoded samples of whole shards; worker ``w`` of ``W`` takes shards ``w::W``. Yields
    ``{"shard": i, "item": {...}}`` per sample and ``{"shard": i, "end": True, "skips": [...]}``
    after each shard."""

    def __init__(self, shards: list[str], todo: list[int], codec: PixelCodec, seed: int):
        self.shards, self.todo, self.codec, self.seed = shards, todo, codec, seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        for i in self.todo[worker::workers]:
            skips = []
            try:
                for raw in iter_tar_samples(self.shards[i], wanted=self.codec.wanted):
                    try:
                        cand = self.codec.inspect(raw)
                        item = self.codec.decode(cand, np.random.default_rng([self.seed, 0, i, raw.index]), 0)
                        item["video"] = item["video"].permute(3, 0, 1, 2).contiguous()  # [3, T, H, W]
                        # Licence / source / hash travel into the latent sample, so latent runs
                        # are counted per licence and data.exclude still reaches them.
                        item["provenance"] = cand.meta.get("provenance")
                    except Skip as exc:
                        skips.append([raw.key, exc.reason, exc.message])
                        continue
                    yield {"shard": i, "item": item}
            except Exception as exc:  # unreadable / truncated tar: keep what was read
                skips.append(["*", "bad_shard", f"{type(exc).__name__}: {exc}"])
            yield {"shard": i, "end": True, "skips": skips}


def encode_latent_shards(
    shards: str | os.PathLike | Sequence[str],
    out_dir: str | os.PathLike,
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_frames: int = 17,
    frame_stride: int = 1,
    fps: float | None = None,
    resolution: tuple[int, int] = (64, 64),
    position: str = "start",
    crop: str = "center",
    max_crop: float = DEFAULT_MAX_CROP,
    batch_size: int = 8,
    text_encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]] | None = None,
    dtype: str = "float16",
    num_workers: int = 0,
    seed: int = 0,
    resume: bool = True,
    provenance: dict | None = None,
    audio_rate: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> dict | None:
    """Encode every usable sample of ``shards`` into latent shards in ``out_dir``; returns the
    latent manifest. ``encode`` gets uint8 ``[B, 3, T, H, W]`` on CPU and returns float
    ``[B, C, t, h, w]`` (any device); it runs under ``torch.no_grad()``. ``provenance``
    (e.g. ``{"autoencoder": {...}, "text_encoder": {"path", "sha256", "max_len"}}``) is
    written into the manifest, so training refuses embeddings of another encoder.
    ``audio_rate > 0`` stores each clip's audio window (``PixelCodec(audio_rate=...)``).

    ``world_size > 1`` (one call per rank, e.g. under torchrun or srun): this rank encodes
    input shards ``rank::world_size`` only, journals them in its own journal and returns
    ``None``; once every rank is done, one process calls ``write_latent_manifest(out_dir,
    world_size)``. Output shards keep their input shard's name, so ranks never write the same
    file, and each sample's clip is drawn from the input shard's index, not the rank: the
    result equals a one-process run's."""
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be float16 or float32, got {dtype!r}")
    urls = resolve_shards(shards)
    names = [os.path.basename(u.split()[-1]) for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("input shard names must be unique (latent shards reuse them)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clip = {"num_frames": num_frames, "frame_stride": frame_stride, "fps": fps,
            "resolution": list(resolution), "position": position, "crop": crop, "seed": seed}
    if max_crop < 1.0:  # only when bounded: journals written before the bound stay resumable
        clip["max_crop"] = float(max_crop)
    if audio_rate:  # only when on: journals of runs without audio stay resumable
        clip["audio_rate"] = int(audio_rate)
    journal = Journal(out / journal_name(rank, world_size), {"shards": names, "clip": clip, "dtype": dtype,
                                      "text": text_encode is not None,
                                      "provenance": provenance or {}})
    previous = journal.records() if resume else None
    if previous is None:
        journal.start()
    records = [r for r in previous or [] if (out / r["shard"]).is_file()]
    mine = list(range(len(names)))[rank::world_size]
    if world_size == 1:
        remove_partial_shards(out)  # of an interrupted run
    else:  # only our own: the other ranks are writing theirs right now
        for name in os.listdir(out):
            if any(name.startswith(f".{names[i]}{TMP_MARK}") for i in mine):
                (out / name).unlink()
    done = {r["shard"] for r in records}
    todo = [i for i in mine if names[i] not in done]

    bucket = Bucket(resolution[0], resolution[1], num_frames, batch_size)
    codec = PixelCodec(BucketSet([bucket], upscale=True, frame_stride=frame_stride, fps=fps), position, crop,
                       audio_rate=audio_rate, max_crop=max_crop)
    # Open latent shards by input shard index (workers interleave shards), with their entries.
    writers: dict[int, tuple[TarShard, list[dict]]] = {}
    pending: list[tuple[int, dict]] = []
    np_dtype = DTYPES[dtype]

    def writer_for(i: int) -> tuple[TarShard, list[dict]]:
        if i not in writers:
            writers[i] = (TarShard(out / names[i]), [])
        return writers[i]

    @torch.no_grad()
    def flush() -> None:
        from safetensors.numpy import save

        if not pending:
            return
        video = torch.stack([it["video"] for _, it in pending])
        lat = encode(video).detach().float().cpu().numpy()
        emb = mask = None
        if text_encode is not None:
            emb, mask = text_encode([it["caption"] for _, it in pending])
            emb, mask = emb.detach().float().cpu().numpy(), mask.detach().cpu().numpy()
        for j, (i, it) in enumerate(pending):
            tensors = {"latents": lat[j].astype(np_dtype), "actions": np.ascontiguousarray(it["actions"], np.int64),
                       "camera": np.ascontiguousarray(it["camera"], np.float32)}
            if emb is not None:
                tensors.update(text_emb=emb[j].astype(np_dtype), text_mask=mask[j])
            if "audio" in it:
                tensors.update(audio=np.ascontiguousarray(it["audio"], np.float32),
                               audio_mask=np.ascontiguousarray(it["audio_mask"], bool))
            meta = {"caption": it["caption"], "style": it["style"], "source_shard": names[i], "clip": clip}
            if isinstance(it.get("provenance"), dict):
                meta["provenance"] = it["provenance"]
            shard, entries = writer_for(i)
            shard.write({"__key__": it["key"], "safetensors": save(tensors),
                         "json": json.dumps(meta).encode(), "txt": it["caption"].encode()})
            entries.append({"key": it["key"], "latent_shape": list(lat[j].shape)})
        pending.clear()

    def close(i: int, skips: list) -> None:
        shard, entries = writer_for(i)
        shard.close()
        record = {"shard": names[i], "count": len(entries), "samples": entries, "skips": skips}
        journal.append(record)
        records.append(record)
        del writers[i]
        for key, reason, message in skips:
            log.warning("encode_latents: skipped %s in %s: %s %s", key, names[i], reason, message)

    dataset = _ShardSamples(urls, todo, codec, seed)
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, collate_fn=_identity)
    try:
        for msg in loader:
            if msg.get("end"):
                flush()
                close(msg["shard"], msg["skips"])
                continue
            pending.append((msg["shard"], msg["item"]))
            if len(pending) >= batch_size:
                flush()
    finally:
        for shard, _ in writers.values():  # interrupted: drop partial shards
            shard.abort()

    if world_size > 1:
        return None
    return _manifest(out, names, records, journal.header["header"])


def journal_name(rank: int = 0, world_size: int = 1) -> str:
    """The journal of one rank of ``world_size`` (one process: ``JOURNAL``)."""
    return JOURNAL if world_size == 1 else f".encode_latents.journal.rank{rank}-of-{world_size}.jsonl"


def write_latent_manifest(out_dir: str | os.PathLike, world_size: int) -> dict:
    """The manifest of a ``world_size``-rank ``encode_latent_shards`` run, from every rank's
    journal (call once, after all ranks finished); the same as a one-process run writes."""
    out = Path(out_dir)
    heads, records = [], []
    for r in range(world_size):
        lines = (out / journal_name(r, world_size)).read_text().splitlines()
        heads.append(json.loads(lines[0])["header"])
        records += [json.loads(line) for line in lines[1:] if line.strip()]
    if any(h != heads[0] for h in heads):
        raise ValueError(f"{out}: the ranks' journals were written with different settings")
    return _manifest(out, heads[0]["shards"], [r for r in records if (out / r["shard"]).is_file()], heads[0])


def _manifest(out: Path, names: list[str], records: list[dict], settings: dict) -> dict:
    """Write the latent manifest of ``records`` (journal records, any order) over input shard
    ``names``; ``settings``: the journal header (clip, dtype, provenance)."""
    clip, dtype, provenance = settings["clip"], settings["dtype"], settings["provenance"]
    order = {n: j for j, n in enumerate(names)}
    records = sorted(records, key=lambda r: order[r["shard"]])  # skipped: in input order
    by_name = {r["shard"]: r for r in records}
    kept = [by_name[n] for n in names if n in by_name and by_name[n]["count"] > 0]
    shapes = {tuple(s["latent_shape"]) for r in kept for s in r["samples"]}
    reasons: dict[str, int] = {}
    for r in records:
        for _, reason, _ in r["skips"]:
            reasons[reason] = reasons.get(reason, 0) + 1
    return write_manifest(
        out, [r["shard"] for r in kept], [r["count"] for r in kept],
        [{**s, "shard": r["shard"]} for r in kept for s in r["samples"]],
        input="latent", latent_shape=list(shapes.pop()) if len(shapes) == 1 else None, dtype=dtype,
        clip=clip, **(provenance or {}), skipped_reasons=reasons, skipped=[[r["shard"], *s] for r in records for s in r["skips"]],
    )
