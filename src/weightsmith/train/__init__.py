"""The train job: the fine-tuning loop (``loop``), its injected optimizer (``optimizer``), checkpoints and
where a run works (``checkpoint``), and run folders (``runs``)."""

from .checkpoint import RunDir
from .loop import (
    DEFAULT_LR,
    FULL,
    HEAD,
    TrainArgs,
    TrainingDiverged,
    TrainResult,
    _schedule,
    check_args,
    check_device,
    finetune,
    method_name,
    train_args,
)
from .optimizer import OptimizerFactory, UpdatesInBackward, adamw_factory
from .runs import export_run_merged, export_run_peft, load_finetuned

__all__ = [
    "DEFAULT_LR",
    "FULL",
    "HEAD",
    "OptimizerFactory",
    "RunDir",
    "TrainArgs",
    "TrainResult",
    "TrainingDiverged",
    "UpdatesInBackward",
    "_schedule",
    "adamw_factory",
    "check_args",
    "check_device",
    "export_run_merged",
    "export_run_peft",
    "finetune",
    "load_finetuned",
    "method_name",
    "train_args",
]
