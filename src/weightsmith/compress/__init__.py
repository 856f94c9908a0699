"""Compressing weights: quantisers, pruners and low-rank compressors (one file each) over one core
(``_core.py``; shared pruning pieces in ``_sparse.py``, low-rank pieces in ``_lowrank.py``) and writers.

Every non-underscore module of this package is imported here, so each method file registers its config
(``weightsmith.config.registered("compress")``) just by being in the package.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._core import (
    CompressConfig,
    Compressed,
    CompressReport,
    calibration_batches,
    check_group_size,
    compress,
    heldout_text,
)
from ._format import FORMATS, load_compressed, save_compressed
from ._lowrank import LowRankConfig, LowRankLinear, LowRankWeight, compress_lowrank, thin_linears
from ._sparse import PruneConfig, SparseWeight
from .asvd import ASVD
from .awq import AWQ
from .dsnot import DSnoT
from .fwsvd import FWSVD
from .gptq import GPTQ
from .hqq import HQQ
from .magnitude import Magnitude
from .rtn import RTN
from .sparsegpt import SparseGPT
from .svd import SVD
from .wanda import Wanda

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "ASVD",
    "AWQ",
    "FORMATS",
    "FWSVD",
    "GPTQ",
    "HQQ",
    "RTN",
    "SVD",
    "CompressConfig",
    "CompressReport",
    "Compressed",
    "DSnoT",
    "LowRankConfig",
    "LowRankLinear",
    "LowRankWeight",
    "Magnitude",
    "PruneConfig",
    "SparseGPT",
    "SparseWeight",
    "Wanda",
    "calibration_batches",
    "check_group_size",
    "compress",
    "compress_lowrank",
    "heldout_text",
    "load_compressed",
    "save_compressed",
    "thin_linears",
]
