"""Heartbeat and stall detection across ranks: a hung job fails fast, naming the culprit.

A rank that dies or stalls leaves the others blocked inside a collective, which gloo/NCCL only
abandon after ``dist.timeout_s`` with an error that does not say which rank is to blame. Each
rank therefore runs a small daemon thread that

1. every ``dist.heartbeat_s`` logs a heartbeat line (``heartbeat rank 0 step 12 ...``) and
   publishes ``(time, step)`` under ``worldline/hb/<rank>`` in the job's rendezvous store (the
   TCPStore torchrun / the launcher already runs; one small write per interval);
2. when its own rank made no progress for ``dist.stall_timeout_s`` (it is blocked), reads the
   peers' entries and, if it can blame someone, prints one ``worldline: error:`` line naming
   the rank(s) and exits the process (exit code 3; the main thread is stuck in C++ and cannot
   be interrupted). The launcher then tears the remaining ranks down.

Who is blamed: ranks whose heartbeat thread stopped (``time`` older than the timeout: the
process is dead or frozen), else ranks whose published step is behind this rank's (they
never reached the collective this rank waits in). When every rank is alive at the same step
(e.g. a hang inside one collective, or a legitimately slow save on all ranks) nothing is
blamed and the collective timeout stays in charge.

Wall clocks are compared across hosts; keep ``stall_timeout_s`` well above clock skew
(seconds at most with NTP).
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Optional

log = logging.getLogger(__name__)

EXIT_STALL = 3
PREFIX = "worldline/hb/"


def _store_client(timeout_s: float) -> Optional[Any]:
    """A private client of the job's rendezvous store (thread-safe use: only our thread)."""
    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return dist.TCPStore(addr, int(port), is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class Watchdog:
    """One per rank; see the module docstring. ``beat(step)`` from the training loop is a pair
    of attribute writes (no I/O, no sync)."""

    def __init__(self, rank: int, world_size: int, heartbeat_s: float, stall_timeout_s: float,
                 store: Optional[Any] = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.heartbeat_s, self.stall_timeout_s = heartbeat_s, stall_timeout_s
        self.store = store
        self.step = 0
        self._last_progress = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @classmethod
    def start_for(cls, rank: int, world_size: int, d: Any, step: int) -> "Watchdog":
        """A started watchdog for this rank at optimizer step ``step`` (``d``: ``dist.*``;
        an inert object when ``dist.heartbeat_s=0``)."""
        store = None
        if d.heartbeat_s > 0 and world_size > 1:
            try:
                store = _store_client(max(d.heartbeat_s, 10.0))
            except Exception as e:  # noqa: BLE001 - heartbeats still get logged
                log.warning("watchdog: rendezvous store unreachable (%s); stall detection off",
                            e)
        dog = cls(rank, world_size, d.heartbeat_s, d.stall_timeout_s, store)
        dog.step = step
        if d.heartbeat_s > 0:
            dog.start()
        return dog

    def start(self) -> None:
        self._publish()
        self._thread = threading.Thread(target=self._run, name="worldline-watchdog",
                                        daemon=True)
        self._thread.start()

    def beat(self, step: int) -> None:
        """Called by the loop as this rank starts optimizer step ``step`` (1-based)."""
        self.step = step
        self._last_progress = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # ----------------------------------------------------------------- thread
    def _publish(self) -> None:
        if self.store is not None:
            self.store.set(f"{PREFIX}{self.rank}",
                           json.dumps({"t": time.time(), "step": self.step}))

    def _peers(self) -> dict[int, dict[str, float]]:
        out = {}
        for r in range(self.world_size):
            if r == self.rank:
                continue
            try:
                if self.store.check([f"{PREFIX}{r}"]):
                    out[r] = json.loads(self.store.get(f"{PREFIX}{r}"))
            except Exception:  # noqa: BLE001 - judged as missing below
                pass
        return out

    def _run(self) -> None:
        interval = self.heartbeat_s
        if self.store is not None and self.stall_timeout_s > 0:
            interval = min(interval, self.stall_timeout_s / 4)
        next_line = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            idle = now - self._last_progress
            if now >= next_line:
                log.info("heartbeat rank %d step %d (%.1f s in this step)", self.rank,
                         self.step, idle)
                next_line = now + self.heartbeat_s
            if self.store is None:
                continue
            try:
                self._publish()
            except Exception as e:  # noqa: BLE001
                if idle > self.stall_timeout_s:
                    self._die(f"rank {self.rank} lost the rendezvous store ({e}) and made no "
                              f"progress for {idle:.0f} s: the store's host (rank 0 or the "
                              f"launcher) is gone")
                continue
            if self.stall_timeout_s > 0 and idle > self.stall_timeout_s:
                blame = self._blame(idle)
                if blame:
                    self._die(blame)

    def _blame(self, idle: float) -> Optional[str]:
        peers = self._peers()
        wall = time.time()
        dead = {r: wall - p["t"] for r, p in peers.items() if wall - p["t"] > self.stall_timeout_s}
        missing = [r for r in range(self.world_size) if r != self.rank and r not in peers]
        if dead or missing:
            parts = [f"rank {r} sent no heartbeat for {age:.0f} s (last seen in step "
                     f"{int(peers[r]['step'])})" for r, age in sorted(dead.items())]
            parts += [f"rank {r} never sent a heartbeat" for r in missing]
            return (f"{'; '.join(parts)}: process dead or frozen (rank {self.rank} waited "
                    f"{idle:.0f} s in step {self.step}, dist.stall_timeout_s="
                    f"{self.stall_timeout_s:g})")
        behind = {r: int(p["step"]) for r, p in peers.items() if p["step"] < self.step}
        if behind:
            who = ", ".join(f"rank {r} (still in step {s})" for r, s in sorted(behind.items()))
            return (f"{who} stalled: it never reached step {self.step}, where rank {self.rank} "
                    f"has waited {idle:.0f} s (dist.stall_timeout_s={self.stall_timeout_s:g})")
        return None

    def _die(self, msg: str) -> None:
        print(f"worldline: error: watchdog: {msg}", file=sys.stderr, flush=True)
        log.error("watchdog: %s", msg)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(EXIT_STALL)
