"""Compressing weights: quantisation methods (one file each) over one core (``_core.py``) and writers.

Every non-underscore module of this package is imported here, so each method file registers its config
(``weightsmith.config.registered("compress")``) just by being in the package.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._core import (
    CompressConfig,
    CompressReport,
    calibration_batches,
    check_group_size,
    compress,
    heldout_text,
)
from ._format import FORMATS, load_compressed, save_compressed
from .awq import AWQ
from .gptq import GPTQ
from .hqq import HQQ
from .rtn import RTN

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "AWQ",
    "FORMATS",
    "GPTQ",
    "HQQ",
    "RTN",
    "CompressConfig",
    "CompressReport",
    "calibration_batches",
    "check_group_size",
    "compress",
    "heldout_text",
    "load_compressed",
    "save_compressed",
]
