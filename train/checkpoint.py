"""Checkpoints: DCP tensors + readable TrainState, complete or absent, with a ``latest`` pointer.

Layout of ``<run dir>/checkpoints/``::

    step_<N>/                 # renamed into place only once every file below is written
        .metadata, *.distcp   # torch.distributed.checkpoint: model, optim, ema, frozen modules
        train_state.json      # TrainState (step, data position, scheduler, W&B id, ...)
        ranks/rank_<r>.pt     # per-rank RNG states (tensors only: loads with weights_only)
        ranks/rank_<r>.json   # per-rank data-loader position (each rank streams its own shards)
        meta.json             # resolved config, world size, versions
        provenance.json       # samples consumed so far per licence / source (all ranks)
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
from torch.distributed.checkpoint.api import CheckpointException

from worldline.data.atomic import atomic_write_text, fsync_path
from worldline.data.provenance import summarize_states
from worldline.train import failpoints
from worldline.train.state import TrainState

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d+)$")
LATEST = "latest"


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@contextmanager
def _quiet_dcp() -> Iterator[None]:
    # DCP warns on every call when no process group exists; single-process use is intended.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written on some rank. Raised on every rank alike; the
    previous checkpoint (``latest``) is untouched and the partial write removed."""


def _agree(failed: bool) -> list[int]:
    """Ranks that report a failure (one all-reduce; every rank gets the same list)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if failed else []
    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = int(failed)
    dist.all_reduce(flags)  # gloo group of the default PG; CPU tensor works for gloo
    return [r for r, f in enumerate(flags.tolist()) if f]


def _describe(err: BaseException) -> str:
    """One line per error; DCP's CheckpointException carries every rank's exception (and a
    multi-line traceback in its str), so list the ranks' errors instead."""
    if isinstance(err, CheckpointException):
        return "; ".join(f"rank {r}: {type(e[0]).__name__}: {e[0]}"
                         for r, e in sorted(err.failures.items()))
    return f"{type(err).__name__}: {err}"


@contextmanager
def _phase(step: int, partial: Path, what: str) -> Iterator[None]:
    """One write phase of a save: on any rank's error, all ranks clean up and raise."""
    err: Optional[BaseException] = None
    try:
        yield
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - OSError, DCP's, ...
        err = e  # (DCP's CheckpointException derives from BaseException, not Exception)
    bad = _agree(err is not None)
    if not bad:
        return
    if _rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    local = f": {_describe(err)}" if err is not None else ""
    raise CheckpointWriteError(
        f"checkpoint step_{step}: {what} write failed on rank(s) {bad}{local}") from err


DS_TAG = "ds"  # DeepSpeed's engine checkpoint lives in step_<N>/ds/


def is_deepspeed(ckpt: Path) -> bool:
    return (Path(ckpt) / DS_TAG).is_dir()


# The only non-tensor classes DeepSpeed 0.19 pickles into its ZeRO checkpoints (measured with
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 and universal files).
DEEPSPEED_PICKLE_ALLOWLIST = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


def verify_deepspeed_files(ckpt: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose pickles reference anything but tensors, plain
    containers and :data:`DEEPSPEED_PICKLE_ALLOWLIST`.

    DeepSpeed's own loaders (``engine.load_checkpoint``, ``zero_to_fp32``) call ``torch.load``
    with ``weights_only=False``; this scan (the same opcode-level check ``weights_only`` uses,
    without unpickling anything) runs first, so a planted ``__reduce__`` payload is rejected
    before DeepSpeed ever opens the file."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for f in sorted(Path(ckpt).rglob("*.pt")):
        if f.name == "extra.pt" or f.parent.name == "ranks":
            continue  # ours, always read with weights_only=True
        bad = set(get_unsafe_globals_in_checkpoint(str(f))) - DEEPSPEED_PICKLE_ALLOWLIST
        if bad:
            raise ValueError(f"refusing to load {f}: it pickles {sorted(bad)}, which a "
                             f"DeepSpeed checkpoint never contains (possible code injection)")


def is_export(path: Path) -> bool:
    """A ``worldline-export`` folder (consolidated safetensors + config.json)."""
    return (Path(path) / "model.safetensors").is_file() and (Path(path) / "config.json").is_file()


def is_pipeline_folder(path: Path) -> bool:
    """A WorldPipeline folder (``model_index.json`` + one folder per model), e.g. the
    ``base/`` and ``merged/`` folders ``worldline-lora`` writes."""
    return (Path(path) / "model_index.json").is_file()


def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its tensors (DCP metadata, or DeepSpeed's tag dir) and
    train state both exist. Everything is written inside a ``.partial`` dir first anyway."""
    return ((ckpt / ".metadata").is_file() or is_deepspeed(ckpt)) and \
        (ckpt / "train_state.json").is_file()


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
    if p.is_dir() and (is_complete(p) or is_export(p) or is_pipeline_folder(p)):
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = latest_checkpoint(root)
            if found is not None:
                return found
    raise FileNotFoundError(f"no complete checkpoint at or under {p}")


#: Hydra ``_target_`` values a config read from a checkpoint may carry. Worldline builds every
#: object from typed dataclasses and never calls ``hydra.utils.instantiate``, so the list is
#: empty: a checkpoint from elsewhere cannot name a callable to run.
ALLOWED_TARGETS: frozenset[str] = frozenset()


def check_targets(node: Any, source: str, key: str = "config") -> None:
    """Raise ``ConfigError`` when ``node`` (a config tree) holds a ``_target_`` outside
    :data:`ALLOWED_TARGETS`, naming the file and the key."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_target_" and v not in ALLOWED_TARGETS:
                from worldline.train.config import ConfigError

                raise ConfigError(f"invalid config: {source}: {key}._target_={v!r} is not in "
                                  f"the allowlist of instantiable targets "
                                  f"({sorted(ALLOWED_TARGETS) or 'empty'}); refusing to load it")
            check_targets(v, source, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            check_targets(v, source, f"{key}[{i}]")


def read_meta(ckpt: Path) -> dict[str, Any]:
    """meta.json of a checkpoint, or config.json of an export folder (same "config" key).
    Its config is untrusted input: see :func:`check_targets`."""
    f = ckpt / "meta.json"
    f = f if f.is_file() else ckpt / "config.json"
    meta = json.loads(f.read_text())
    check_targets(meta.get("config"), str(f))
    return meta


class Checkpointer:
    """Saves and restores one run's checkpoints (every rank calls every method)."""

    def __init__(self, run_dir: Path, keep_last: int, async_save: bool = False) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        self.async_save = async_save
        # (future, partial dir, final dir, shared files) of an async save still being written.
        self._pending: Optional[tuple[Any, Path, Path, dict[str, str]]] = None
        self._async_pg = None
        if async_save and dist.is_available() and dist.is_initialized():
            # The background write's collectives run on their own gloo group so they never
            # interleave with the training loop's collectives on the default group.
            self._async_pg = dist.new_group(backend="gloo")

    def save(
        self,
        step: int,
        tensors: Optional[dict[str, Any]],
        train_state: TrainState,
        rng: dict[str, Any],
        meta: dict[str, Any],
        writer: Optional[Any] = None,
    ) -> Path:
        """Write ``step_<step>`` atomically, then move ``latest`` to it and prune old ones.

        ``tensors`` is a DCP state dict (nested dicts of tensors/DTensors), e.g.
        ``{"model": ..., "optim": ..., "ema": ...}``; or ``writer(partial_dir)`` writes the
        tensors itself on every rank (DeepSpeed's engine). With ``async_save`` the DCP write
        continues in the background: the call blocks only for the state copy, and the
        rename + ``latest`` happen once the write completed (:meth:`wait`, or a later call).
        """
        self.wait()  # never two saves in flight; the previous one lands first
        rank = _rank()
        final = self.root / f"step_{step}"
        partial = self.root / f".step_{step}.partial"
        t0 = time.perf_counter()
        shared = {
            "train_state.json": json.dumps(
                {**train_state.to_dict(), "data": "per rank: ranks/rank_<r>.json"}, indent=1),
            "meta.json": json.dumps(meta, indent=1, default=str),
        }
        # Every write phase ends in an agreement (one tiny all-reduce): a rank whose disk is
        # full must not leave the others waiting in a barrier, and all ranks must raise the
        # same CheckpointWriteError. ``latest`` is untouched until the last phase succeeds.
        with _phase(step, partial, "prepare"):
            if rank == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                if partial.exists():  # left by a crash during an earlier save of this step
                    shutil.rmtree(partial)
                partial.mkdir()
        with _phase(step, partial, "per-rank state"):
            (partial / "ranks").mkdir(exist_ok=True)
            torch.save(rng, partial / "ranks" / f"rank_{rank}.pt")
            atomic_write_text(partial / "ranks" / f"rank_{rank}.json",
                               json.dumps({"data": train_state.data}))
            failpoints.during_save(step, rank)
        if self.async_save and writer is None:
            with _phase(step, partial, "async staging"), _quiet_dcp():
                future = dcp.async_save(tensors, checkpoint_id=str(partial),
                                        process_group=self._async_pg)
            # Rank files above are written before this rank joins the write's final
            # collective, so once rank 0's future is done every rank's files are on disk.
            self._pending = (future, partial, final, shared)
            log.info("async checkpoint %s: staged in %.2fs, writing in the background",
                     final.name, time.perf_counter() - t0)
            return final
        # DCP gathers every rank's write result and raises on all ranks if one failed; the
        # agreement below covers DeepSpeed's writer and anything DCP lets through.
        with _phase(step, partial, "tensors"):
            if writer is not None:
                writer(partial)
            else:
                with _quiet_dcp():
                    dcp.save(tensors, checkpoint_id=str(partial))
        failpoints.before_rename(step, rank)
        with _phase(step, partial, "rename"):
            if rank == 0:
                self._finalize(partial, final, shared)
        log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
        return final

    def _finalize(self, partial: Path, final: Path, shared: dict[str, str]) -> None:
        """Rank 0: shared files, rename into place, then ``latest``, then prune."""
        for name, text in shared.items():
            atomic_write_text(partial / name, text)
        # Every rank's data state is on disk by now (the phases above agreed on it): the
        # summary of what the model has seen is written from them, once.
        atomic_write_text(partial / "provenance.json",
                          json.dumps(read_provenance(partial), indent=1, sort_keys=True))
        if final.exists():  # re-saving a step (e.g. resumed at a save boundary)
            shutil.rmtree(final)
        os.replace(partial, final)
        fsync_path(self.root)
        atomic_write_text(self.root / LATEST, final.name)
        self._prune()

    def poll(self) -> None:
        """Finalize a finished async save without blocking (cheap; call every step)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until an async save in flight is written, then make it visible."""
        if self._pending is None:
            return
        future, partial, final, shared = self._pending
        self._pending = None
        t0 = time.perf_counter()
        # No agreement collective here: poll() calls this on ranks at different steps. DCP's
        # async write already reports any rank's failure to every rank through its future.
        try:
            future.result()
            if _rank() == 0:
                self._finalize(partial, final, shared)
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointWriteError(f"checkpoint {final.name}: async write failed: "
                                       f"{_describe(e)}") from e
        log.info("async checkpoint %s complete (waited %.2fs)", final.name,
                 time.perf_counter() - t0)

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, and leftovers of crashed saves.
        A checkpoint is renamed out of the ``step_<N>`` namespace before its files go, so a
        kill during the deletion never leaves a half-deleted dir that looks complete."""
        ckpts = list_checkpoints(self.root)
        doomed = [p for _, p in ckpts[: max(0, len(ckpts) - self.keep_last)]]
        # Called right after a save landed, with no other save in flight: any .partial dir
        # left now belongs to a save a crash interrupted.
        doomed += [p for p in self.root.glob(".step_*.partial")]
        doomed += [p for p in self.root.glob(".step_*.deleting")]
        for p in doomed:
            trash = p if p.name.endswith(".deleting") else \
                p.with_name(f".{p.name.lstrip('.')}.deleting")
            try:
                if trash != p:
                    os.replace(p, trash)
                shutil.rmtree(trash)
            except OSError as e:  # pruning is best effort; it never fails a save
                log.warning("could not delete old checkpoint %s: %s", p, e)

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


def load_data_states(ckpt: Path, old_world: int, old_cp: int = 1) -> list[dict[str, Any]]:
    """Every old data-parallel rank's loader state (CP ranks of one group share theirs), for
    ``ShardLoader.load_state_dict`` after a world-size change."""
    states = []
    for r in range(0, old_world, old_cp):
        f = ckpt / "ranks" / f"rank_{r}.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: cannot reshard the data position")
        states.append(json.loads(f.read_text())["data"])
    return states


def read_provenance(ckpt: Path) -> dict[str, Any]:
    """Samples consumed up to checkpoint ``ckpt`` per licence and per source origin, merged
    from every rank's data-loader state (``data.provenance.summarize_states``) plus ``step``.
    Works for checkpoints written before ``provenance.json`` existed."""
    ckpt = Path(ckpt)
    if not (ckpt / "ranks").is_dir() and (ckpt / "provenance.json").is_file():
        return json.loads((ckpt / "provenance.json").read_text())  # an export folder
    states = [json.loads(f.read_text()).get("data") or {}
              for f in sorted((ckpt / "ranks").glob("rank_*.json"))]
    summary = summarize_states(states)
    m = STEP_RE.match(ckpt.name.lstrip(".").removesuffix(".partial"))
    if m:
        summary["step"] = int(m.group(1))
    return summary


def load_rng(ckpt: Path, rank: int) -> Optional[dict[str, Any]]:
    """This rank's RNG state, or None when the checkpoint came from fewer ranks."""
    f = ckpt / "ranks" / f"rank_{rank}.pt"
    return torch.load(f, weights_only=True) if f.is_file() else None


def checkpoint_keys(ckpt: Path) -> set[str]:
    """Top-level DCP keys present in ``ckpt`` (e.g. {"model", "optim", "ema"})."""
    from torch.distributed.checkpoint import FileSystemReader

    if is_export(ckpt):
        return {f.stem for f in Path(ckpt).glob("*.safetensors")}
    if is_pipeline_folder(ckpt):
        index = json.loads((Path(ckpt) / "model_index.json").read_text())
        return {"autoencoder", *(["model"] if "transformer" in index else [])}
    if is_deepspeed(ckpt):
        extra = torch.load(Path(ckpt) / "extra.pt", weights_only=True)
        return {"model", *extra}
    md = FileSystemReader(str(ckpt)).read_metadata()
    return {k.split(".", 1)[0] for k in md.state_dict_metadata}
