"""Merging checkpoints and adapters in weight space.

Every non-underscore module of this package is imported here, so each merge method file registers
its configs (``weightsmith.config.registered("merge")``) just by being in the package.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._core import TaskVector, check_inputs, write_model
from .lora_merge import LoRAMerge, merge_adapters
from .opcm import OPCM, merge_continual, opcm
from .recipe import load_recipe, merge
from .recipe import run as run_recipe
from .task_arithmetic import (
    DARE,
    DARETIES,
    GTA,
    TIES,
    Average,
    TaskArithmetic,
    merge_state_dicts,
    merge_tensors,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "DARE", "DARETIES", "GTA", "OPCM", "TIES", "Average", "LoRAMerge", "TaskArithmetic", "TaskVector",
    "check_inputs", "load_recipe", "merge", "merge_adapters", "merge_state_dicts", "merge_continual",
    "merge_tensors", "opcm", "run_recipe", "write_model",
]  # fmt: skip
