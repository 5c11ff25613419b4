"""Checkpoints: DCP tensors + readable TrainState, complete or absent, with a ``latest`` pointer.

Layout of ``<run dir>/checkpoints/``::

    step_<N>/                 # renamed into place only once every file below is written
        .metadata, *.distcp   # torch.distributed.checkpoint: model, optim, ema, frozen modules
        train_state.json      # TrainState (step, data position, scheduler, W&B id, ...)
        ranks/rank_<r>.pt     # per-rank RNG states (tensors only: loads with weights_only)
        ranks/rank_<r>.json   # per-rank data-loader position (each rank streams its own shards)
        meta.json             # resolved config, world size, versions
    latest                    # text file "step_<N>", written last (atomically)

DCP stores tensors by fully-qualified name, not by rank, so a checkpoint written by N ranks
loads on M ranks (the distributed engine relies on this for resharding).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner

from worldline.train.state import TrainState

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    # DCP warns on every call when no process group exists; single-process use is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its DCP metadata and train state both exist."""
    return (ckpt / ".metadata").is_file() and (ckpt / "train_state.json").is_file()


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete ``step_<N>`` dirs under ``ckpt_root``, oldest first."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or the newest complete one if the pointer is missing
    or stale (e.g. a crash between the rename and the pointer write)."""
    pointer = ckpt_root / LATEST
    if pointer.is_file():
        target = ckpt_root / pointer.read_text().strip()
        if target.is_dir() and is_complete(target):
            return target
    ckpts = list_checkpoints(ckpt_root)
    return ckpts[-1][1] if ckpts else None


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint dir, a run dir or a run's ``checkpoints/`` dir; return a complete
    checkpoint dir or raise ``FileNotFoundError`` naming the path."""
    p = Path(path)
    if p.is_dir() and is_complete(p):
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"no complete checkpoint at or under {p}")


def read_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "meta.json").read_text())


class Checkpointer:
    """Saves and restores one run's checkpoints (every rank calls every method)."""

    def __init__(self, run_dir: Path, keep_last: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def save(
        self,
        step: int,
        tensors: dict[str, Any],
        train_state: TrainState,
        rng: dict[str, Any],
        meta: dict[str, Any],
    ) -> Path:
        """Write ``step_<step>`` atomically, then move ``latest`` to it and prune old ones.

        ``tensors`` is a DCP state dict (nested dicts of tensors/DTensors), e.g.
        ``{"model": ..., "optim": ..., "ema": ...}``.
        """
        rank = _rank()
        final = self.root / f"step_{step}"
        partial = self.root / f".step_{step}.partial"
        t0 = time.perf_counter()
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a crash during an earlier save of this step
                shutil.rmtree(partial)
            partial.mkdir()
        _barrier()
        with _quiet_dcp():
            dcp.save(tensors, checkpoint_id=str(partial))
        (partial / "ranks").mkdir(exist_ok=True)
        torch.save(rng, partial / "ranks" / f"rank_{rank}.pt")
        _atomic_write_text(partial / "ranks" / f"rank_{rank}.json",
                           json.dumps({"data": train_state.data}))
        _barrier()
        if rank == 0:
            shared = {**train_state.to_dict(), "data": "per rank: ranks/rank_<r>.json"}
            _atomic_write_text(partial / "train_state.json", json.dumps(shared, indent=1))
            _atomic_write_text(partial / "meta.json", json.dumps(meta, indent=1, default=str))
            if final.exists():  # re-saving a step (e.g. resumed at a save boundary)
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            _atomic_write_text(self.root / LATEST, final.name)
            self._prune()
        _barrier()
        log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
        return final

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root)
        for _, p in ckpts[: max(0, len(ckpts) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)

    def latest(self) -> Optional[Path]:
        return latest_checkpoint(self.root)


def load_tensors(ckpt: Path, tensors: dict[str, Any], allow_partial: bool = False) -> None:
    """Load ``ckpt`` into the (pre-allocated) DCP state dict ``tensors`` in place.

    ``allow_partial`` lets the target hold keys the checkpoint lacks (new modules added by a
    later stage keep their fresh initialisation)."""
    planner = DefaultLoadPlanner(allow_partial_load=allow_partial)
    with _quiet_dcp():
        dcp.load(tensors, checkpoint_id=str(ckpt), planner=planner)


def load_train_state(ckpt: Path, rank: int) -> TrainState:
    """The shared TrainState with this rank's data-loader position filled in."""
    state = TrainState.from_dict(json.loads((ckpt / "train_state.json").read_text()))
    f = ckpt / "ranks" / f"rank_{rank}.json"
    state.data = json.loads(f.read_text())["data"] if f.is_file() else {}
    return state


def load_rng(ckpt: Path, rank: int) -> Optional[dict[str, Any]]:
    """This rank's RNG state, or None when the checkpoint came from fewer ranks."""
    f = ckpt / "ranks" / f"rank_{rank}.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None


def checkpoint_keys(ckpt: Path) -> set[str]:
    """Top-level DCP keys present in ``ckpt`` (e.g. {"model", "optim", "ema"})."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(ckpt)).read_metadata()
    return {k.split(".", 1)[0] for k in md.state_dict_metadata}


def load_module_weights(
    module: torch.nn.Module, ckpt: Path, key: str = "model", prefer_ema: bool = True,
    allow_partial: bool = False,
) -> bool:
    """Load a plain (unwrapped) module's weights saved under ``key`` in ``ckpt``; when
    ``prefer_ema`` and the checkpoint holds EMA weights for it (``ema_<key>`` or ``ema``
    for the trained model), overlay those on the parameters. Returns whether EMA was used."""
    sd = {k: v for k, v in module.state_dict().items()}
    load_tensors(ckpt, {key: sd}, allow_partial=allow_partial)
    used_ema = False
    ema_key = "ema" if key == "model" else f"ema_{key}"
    if prefer_ema and ema_key in checkpoint_keys(ckpt):
        ema = {n: p.detach().clone() for n, p in module.named_parameters()}
        load_tensors(ckpt, {ema_key: ema}, allow_partial=True)
        sd.update(ema)
        used_ema = True
    module.load_state_dict(sd)
    return used_ema
