"""Merging checkpoints and adapters in weight space.

Every non-underscore module of this package is imported here, so each merge method file registers
its configs (``weightsmith.config.registered("merge")``) just by being in the package.
"""

from __future__ import annotations

from ..config import import_methods
from ._core import TaskVector, check_inputs, write_model
from .adamerging import AdaMerging
from .arcee_fusion import ArceeFusion
from .breadcrumbs import Breadcrumbs, BreadcrumbsTIES
from .della import DELLA, DELLALinear
from .fisher import Fisher
from .karcher import Karcher
from .lora_merge import LoRAMerge, merge_loras
from .model_stock import ModelStock
from .nearswap import NearSwap
from .opcm import OPCM, merge_continual, opcm
from .passthrough import Passthrough
from .ram import RAM, RAMPlusTL
from .recipe import load_recipe, merge
from .recipe import run as run_recipe
from .regmean import RegMean
from .sce import SCE
from .slerp import SLERP, MultiSLERP, NuSLERP
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

import_methods(__name__, __path__)

__all__ = [
    "DARE", "DARETIES", "GTA", "OPCM", "TIES", "Average", "LoRAMerge", "TaskArithmetic", "TaskVector",
    "check_inputs", "load_recipe", "merge", "merge_loras", "merge_state_dicts", "merge_continual",
    "merge_tensors", "opcm", "run_recipe", "write_model",
    # mergekit's tensor-wise methods (docs/merging-mergekit.md)
    "DELLA", "RAM", "SCE", "SLERP", "ArceeFusion", "Breadcrumbs", "BreadcrumbsTIES", "DELLALinear", "Karcher",
    "ModelStock", "MultiSLERP", "NearSwap", "NuSLERP", "Passthrough", "RAMPlusTL",
    # data-aware merges (docs/merging-data-aware.md)
    "AdaMerging", "Fisher", "RegMean",
]  # fmt: skip
