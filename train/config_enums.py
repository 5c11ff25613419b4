"""The enum types of the config schema (train/config.py): every field with a fixed set of
values is one of these, so OmegaConf rejects any other value during composition, naming the
key. ``ConfigEnum`` is a ``str``: ``cfg.train.precision == "bf16"``, f-strings and
``json.dumps`` see plain strings. Member names equal their values because OmegaConf converts a
YAML string by member *name*."""
from __future__ import annotations

from enum import Enum

__all__ = ['ConfigEnum', 'StageName', 'Objective', 'Condition', 'DistBackend', 'ActivationCheckpointing', 'LoggerKind', 'LoggerMode', 'Precision', 'LRSchedule', 'OnSaveError', 'DataKind', 'ClipPosition', 'Crop', 'DataInput', 'SampleMode', 'Solver', 'SlurmMode']


class ConfigEnum(str, Enum):
    """Base of the config enums: a ``str`` that prints, formats and JSON-encodes as its value
    (so f-strings, log lines, ``==`` against literals and ``json.dumps`` see plain strings)."""

    def __str__(self) -> str:
        return str.__str__(self)

    __format__ = str.__format__


def _enum(name: str, *values: str) -> type[ConfigEnum]:
    """A ConfigEnum whose member names are its values (functional form: ``continue`` and other
    keywords are valid values but not valid class-attribute names)."""
    return ConfigEnum(name, [(v, v) for v in values], module=__name__, qualname=name)  # type: ignore[return-value]


StageName = _enum("StageName", "autoencoder", "pretrain", "controllability", "finetune",
                  "self_forcing")
Objective = _enum("Objective", "autoencoder", "flow")
Condition = _enum("Condition", "text", "actions", "camera", "refs", "audio")
DistBackend = _enum("DistBackend", "single", "ddp", "fsdp", "deepspeed_zero1", "deepspeed_zero2",
                    "deepspeed_zero3")
ActivationCheckpointing = _enum("ActivationCheckpointing", "none", "full", "every_k",
                                "attention", "selective")
LoggerKind = _enum("LoggerKind", "wandb", "none")
LoggerMode = _enum("LoggerMode", "offline", "online", "disabled")
Precision = _enum("Precision", "fp32", "bf16")
LRSchedule = _enum("LRSchedule", "cosine", "constant")
OnSaveError = _enum("OnSaveError", "continue", "exit")
DataKind = _enum("DataKind", "synthetic", "webdataset")
ClipPosition = _enum("ClipPosition", "start", "center", "random")
Crop = _enum("Crop", "center", "random")
DataInput = _enum("DataInput", "pixel", "latent")
SampleMode = _enum("SampleMode", "full", "rollout")
Solver = _enum("Solver", "euler", "heun")
EvalSplit = _enum("EvalSplit", "heldout", "train")
SlurmMode = _enum("SlurmMode", "torchrun", "srun")
