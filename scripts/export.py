"""``worldline-export``: any backend's checkpoint -> consolidated safetensors + config.json.

Works on one process, without the process group or the backend that wrote the checkpoint:
DCP checkpoints (single / DDP / FSDP, any world size) are read by name; DeepSpeed ZeRO-1/2/3
checkpoints are consolidated with DeepSpeed's ``zero_to_fp32``. The output folder::

    <out>/model.safetensors        trained model, fp32, unwrapped parameter names
    <out>/ema.safetensors          its EMA weights (when the run kept an EMA)
    <out>/<frozen>.safetensors     frozen modules (e.g. autoencoder.safetensors)
    <out>/config.json              {"config": resolved run config, "step", "source", ...}

The folder is accepted wherever a checkpoint is (``worldline-eval eval.checkpoint=<out>``,
``worldline-sample``, ``stage.init_from``, ``load_module_weights``).

Example::

    worldline-export runs/world --out runs/world/export
    python -m worldline.scripts.export runs/world/checkpoints/step_600 --out /tmp/world-600
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from worldline.train import checkpoint as ckpt_lib


def _plain(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    # safetensors wants contiguous, unshared, dense tensors.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()
            if torch.is_tensor(v)}


def consolidated_state(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"model": ..., "ema": ..., <frozen>: ...} full tensors of a checkpoint, one process."""
    if ckpt_lib.is_export(path):
        from safetensors.torch import load_file

        return {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    if ckpt_lib.is_deepspeed(path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt_lib.verify_deepspeed_files(path)  # zero_to_fp32 unpickles without weights_only

        out = {"model": _plain(get_fp32_state_dict_from_zero_checkpoint(str(path),
                                                                         tag=ckpt_lib.DS_TAG))}
        extra = torch.load(path / "extra.pt", weights_only=True)
        out.update({k: _plain(v) for k, v in extra.items()})
        return out
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    keys = ckpt_lib.checkpoint_keys(path) - {"optim"}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed.*")
        sd = _load_state_dict_from_keys(keys=keys, checkpoint_id=str(path))
    return {k: _plain(v) for k, v in sd.items()}


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the export folder for ``checkpoint`` (a run, checkpoints/ or step dir)."""
    from safetensors.torch import save_file

    path = ckpt_lib.resolve_checkpoint(checkpoint)
    meta = ckpt_lib.read_meta(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = consolidated_state(path)
    for key, sd in parts.items():
        save_file(sd, str(out / f"{key}.safetensors"), metadata={"source": str(path)})
    info = {
        "format": "worldline-export",
        "config": meta["config"],
        "step": meta.get("step"),
        "source": str(path),
        "source_backend": meta.get("backend", "single"),
        "source_world_size": meta.get("world_size", 1),
        "files": sorted(f"{k}.safetensors" for k in parts),
        "num_params": {k: sum(v.numel() for v in sd.values()) for k, sd in parts.items()},
    }
    (out / "config.json").write_text(json.dumps(info, indent=1, default=str))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="worldline-export", description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="run dir, its checkpoints/ dir, or a step_<N> dir")
    ap.add_argument("--out", required=True, help="output folder")
    args = ap.parse_args(argv)
    out = export(args.checkpoint, args.out)
    print(out)


if __name__ == "__main__":
    main()
