"""The Trainer's step vs the bare step it wraps: what the loop costs between batches and kernels.

Both sides run in one process, interleaved (ABAB rounds), at one shape:

* **trainer**: the real :class:`~worldline.train.trainer.Trainer`, built the way
  ``worldline-train`` builds it (:func:`~worldline.train.build.build_trainer` on a composed
  config, ``dist=single``, the synthetic data) and run through its own ``train()`` loop: data
  loading, the non-finite guard, clipping, EMA, the LR schedule, hooks, logging every
  ``train.log_every`` steps. A timing hook (last in the hook list) reads the wall time of each
  loop iteration; after every ``--steps`` trainer steps it runs a round of bare steps.
* **bare**: forward of the same objective + backward + fused AdamW + ``zero_grad`` on a copy
  of the same model, on a batch already on the device (no loader, no guard, no EMA, no clip).

Per round each side's mean step time; the medians over rounds give ``trainer_s``, ``bare_s``
and ``ratio = trainer_s / bare_s`` (also ``ratio_rounds``: the median of per-round ratios).

    python -m worldline.scripts.bench_trainer                 # default shape, JSON to stdout
    python -m worldline.scripts.bench_trainer --quick --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

from worldline.train.hooks import Hook


class _BareStep:
    """forward + backward + fused AdamW + zero_grad of a copy of the trainer's model."""

    def __init__(self, trainer: Any, batch: Any) -> None:
        from worldline.train.objectives import MicroBatchRNG

        self.pipe = copy.deepcopy(trainer.pipeline)
        self.objective = trainer.objective
        self.batch = batch.to(trainer.device)
        params = [p for p in self.pipe.autoencoder.parameters() if p.requires_grad] \
            if trainer.pipeline.world_model is None else \
            [p for p in self.pipe.world_model.parameters() if p.requires_grad]
        # The trainer's optimizer settings (fused AdamW) on the copy's parameters.
        group = trainer.optimizer.param_groups[0]
        self.opt = torch.optim.AdamW(params, lr=group["lr"], betas=group["betas"],
                                     eps=group["eps"], weight_decay=group["weight_decay"],
                                     fused=True)
        self.rng = MicroBatchRNG(torch.Generator(trainer.device).manual_seed(0), 0)
        self.device = trainer.device
        self.precision = trainer.precision

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.precision.autocast(self.device.type):
            loss, _ = self.objective.loss(self.pipe, self.batch, self.rng)
        loss.backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Interleave(Hook):
    """Times each loop iteration of the trainer; every ``k`` timed steps runs ``k`` bare steps
    (ABAB), so both sides see the same machine state (thermal, other load)."""

    def __init__(self, bare: _BareStep, warmup: int, k: int, rounds: int) -> None:
        self.bare, self.warmup, self.k, self.rounds = bare, warmup, k, rounds
        self.trainer_rounds: list[list[float]] = []
        self.bare_rounds: list[list[float]] = []
        self._mark: Optional[float] = None
        self._cur: list[float] = []

    def after_step(self, trainer: Any, step: int) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        now = time.perf_counter()
        if step == self.warmup:  # bare warm-up, then the first timed trainer step starts
            for _ in range(2):
                self.bare()
        elif self._mark is not None and len(self.trainer_rounds) < self.rounds:
            self._cur.append(now - self._mark)
            if len(self._cur) == self.k:
                self.trainer_rounds.append(self._cur)
                self._cur = []
                times = []
                for _ in range(self.k):
                    t0 = time.perf_counter()
                    self.bare()
                    times.append(time.perf_counter() - t0)
                self.bare_rounds.append(times)
        self._mark = time.perf_counter() if step >= self.warmup else None


def bench(model: str, frames: int, size: int, batch: int, rounds: int, k: int, warmup: int,
          threads: int, log_every: int, workers: int, extra: list[str],
          root: Path) -> dict[str, Any]:
    """Run the interleaved benchmark; returns the JSON-able result."""
    from hydra import compose, initialize_config_module

    import worldline.train.main  # noqa: F401  (registers the config schema)
    from worldline.train.build import build_trainer
    from worldline.train.loaders import LoaderFactory
    from worldline.train.validate import validate

    # One extra step at the end: the run's last step also checkpoints and samples.
    steps = warmup + rounds * k + 1
    overrides = [
        "stage=autoencoder", f"model={model}", "data=synthetic", "dist=single", "logger=none",
        f"run.root={root / 'runs'}", "run.name=bench", f"data.root={root / 'data'}",
        f"data.num_frames={frames}", f"data.resolution=[{size},{size}]",
        f"data.batch_size={batch}", f"data.num_workers={workers}",
        f"data.synthetic.num_frames={frames}",
        f"data.synthetic.height={size}", f"data.synthetic.width={size}",
        "data.synthetic.num_clips=16", "data.synthetic.clips_per_shard=4",
        f"train.steps={steps}", f"train.log_every={log_every}", "train.ckpt_every=100000",
        "train.progress_bar=false", "sample.num_steps=1", f"run.threads={threads}", *extra]
    with initialize_config_module(config_module="worldline.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    validate(cfg)
    trainer = build_trainer(cfg)
    first = next(iter(LoaderFactory(cfg).make({"num_workers": 0}, shuffle=False)))
    timer = _Interleave(_BareStep(trainer, first), warmup, k, rounds)
    trainer.hooks.append(timer)
    trainer.train()
    tr = [statistics.fmean(r) for r in timer.trainer_rounds]
    ba = [statistics.fmean(r) for r in timer.bare_rounds]
    trainer_s, bare_s = statistics.median(tr), statistics.median(ba)
    return {
        "ratio": trainer_s / bare_s,
        "ratio_rounds": statistics.median(t / b for t, b in zip(tr, ba)),
        "trainer_s": trainer_s, "bare_s": bare_s,
        "trainer_rounds_s": tr, "bare_rounds_s": ba,
        "shape": {"model": model, "stage": "autoencoder", "batch": batch, "frames": frames,
                  "height": size, "width": size},
        "rounds": rounds, "steps_per_round": k, "warmup": warmup, "log_every": log_every,
        "num_workers": workers,
        "threads": torch.get_num_threads(), "device": str(trainer.device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__, "machine": platform.machine(),
        "overrides": overrides,
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape, few rounds (a test)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--size", type=int, default=32, help="clip height = width")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3, help="steps per side per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--log-every", type=int, default=10, help="train.log_every")
    ap.add_argument("--workers", type=int, default=1,
                    help="data.num_workers (1: the synthetic data config's default)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides (key=value)")
    a = ap.parse_args(argv)
    if a.quick:
        a.frames, a.size, a.batch, a.rounds, a.steps, a.warmup = 9, 32, 2, 2, 1, 1
        # A smoke test inside a test suite: one thread and no loader worker, so another job on
        # a 2-core host cannot leave OpenMP threads spinning on descheduled siblings (a
        # suite run took 300 s for this 8 s command beside another test process).
        a.threads, a.workers = a.threads or 1, 0
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as tmp:
        res = bench(a.model, a.frames, a.size, a.batch, a.rounds, a.steps, a.warmup,
                    a.threads, a.log_every, a.workers, list(a.overrides), Path(tmp))
    text = json.dumps(res, indent=1)
    print(text)
    print(f"trainer {res['trainer_s'] * 1e3:.1f} ms/step, bare {res['bare_s'] * 1e3:.1f} "
          f"ms/step, ratio {res['ratio']:.3f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
