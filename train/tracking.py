"""Run tracking: ``metrics.jsonl`` in the run dir (always) and W&B (offline by default).

Only rank 0 writes. W&B's caches and config are pointed inside the run dir so a run never
writes to ``~/.cache`` or ``~/.config``; API keys stay in the environment and are never copied
into configs, logs or the run dir.
"""
from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                continue
    return rows


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (skips a torn trailing line)."""
    return _read_jsonl(Path(run_dir) / "metrics.jsonl")


SECRET_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "HF_TOKEN")
_SECRET_KEY_WORDS = ("api_key", "apikey", "token", "secret", "password")


def redact_secrets(node: Any) -> Any:
    """``node`` with secrets replaced by ``"<redacted>"``: values of keys that name a secret
    (``api_key``, ``token``, ...) and any string containing the value of a secret environment
    variable (e.g. a W&B key pasted into ``logger.notes``). Applied to everything Worldline
    hands to W&B; config.yaml and checkpoints cannot hold such keys (the schema has none)."""
    secrets = [v for v in (os.environ.get(k) for k in SECRET_ENV) if v and len(v) >= 8]

    def walk(x: Any, key: str = "") -> Any:
        k = key.lower()
        if any(k == w or k.endswith("_" + w) for w in _SECRET_KEY_WORDS) and x not in (None, ""):
            return "<redacted>"
        if isinstance(x, dict):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v) for v in x]
        if isinstance(x, str) and any(s in x for s in secrets):
            return "<redacted>"
        return x

    return walk(node)


class Tracker:
    """Writes metrics and media for one run. Construct on every rank; only rank 0 writes."""

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: Any,
        run_name: str,
        config: dict[str, Any],
        resume_step: Optional[int],
        run_id: Optional[str],
        rank: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = rank == 0
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.wandb = None
        self.run_id = run_id
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            # Rows past the checkpoint describe work that was lost with the crash; the resumed
            # run logs those steps again, so keep the file one row per step. The validation
            # "at" the checkpoint's step runs before the next step, after the save, so the
            # resumed run repeats it: its row goes too.
            rows = [r for r in _read_jsonl(self.metrics_path)
                    if r.get("step", 0) < resume_step
                    or (r.get("step", 0) == resume_step and "val/val_loss" not in r)]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._metrics_file = open(self.metrics_path, "a", buffering=1)
        if logger_cfg.kind == "wandb" and logger_cfg.mode != "disabled":
            self._init_wandb(logger_cfg, run_name, config)

    def _init_wandb(self, cfg: Any, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        config = redact_secrets(config)

        # Absolute: a process started by another W&B user inherits its wandb-core service
        # (WANDB_SERVICE), which resolves relative paths against its own working directory.
        root = self.run_dir.resolve()
        wdir = root / "wandb"
        wdir.mkdir(parents=True, exist_ok=True)
        for var, sub in (("WANDB_CACHE_DIR", ".cache"), ("WANDB_CONFIG_DIR", ".config"),
                         ("WANDB_DATA_DIR", ".data"), ("WANDB_ARTIFACT_DIR", ".artifacts")):
            os.environ.setdefault(var, str(wdir / sub))
        os.environ.setdefault("WANDB_SILENT", "true")
        # Our own id (W&B's generator is not public API); kept in TrainState for resume.
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        self.wandb = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=run_name,
            id=self.run_id,
            resume="allow",
            dir=str(root),
            mode=cfg.mode,
            group=cfg.group,
            tags=list(cfg.tags),
            notes=cfg.notes,
            config=config,
        )
        log.info("W&B run %s (%s) in %s", self.run_id, cfg.mode, wdir)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """One row in metrics.jsonl and one W&B step. Values must already be Python numbers."""
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        self._metrics_file.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_media(self, step: int, videos: dict[str, Path], images: dict[str, Path]) -> None:
        """Log mp4 files as ``wandb.Video`` and PNGs as ``wandb.Image`` (files stay in the run
        dir either way)."""
        if not self.enabled or self.wandb is None:
            return
        import wandb

        payload: dict[str, Any] = {k: wandb.Video(str(v), format="mp4") for k, v in videos.items()}
        payload.update({k: wandb.Image(str(v)) for k, v in images.items()})
        self.wandb.log(payload, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
