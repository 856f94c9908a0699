"""The train job: the fine-tuning loop (``loop``), checkpoints (``checkpoint``) and run folders (``runs``)."""

from .loop import (
    DEFAULT_LR,
    FULL,
    HEAD,
    TrainArgs,
    TrainingDiverged,
    TrainResult,
    _schedule,
    finetune,
    method_name,
)
from .runs import export_run_merged, export_run_peft, load_finetuned

__all__ = [
    "DEFAULT_LR",
    "FULL",
    "HEAD",
    "TrainArgs",
    "TrainResult",
    "TrainingDiverged",
    "_schedule",
    "export_run_merged",
    "export_run_peft",
    "finetune",
    "load_finetuned",
    "method_name",
]
