"""Compressing weights: quantisers, pruners and low-rank compressors (one file each) over one core
(``_core.py``; shared pruning pieces in ``_sparse.py``, low-rank pieces in ``_lowrank.py``) and writers.

Every non-underscore module of this package is imported here, so each method file registers its config
(``weightsmith.config.registered("compress")``) just by being in the package.
"""

from __future__ import annotations

from ..config import import_methods
from ._core import (
    CompressConfig,
    Compressed,
    CompressReport,
    calibration_batches,
    check_group_size,
    compress,
    heldout_text,
)
from ._format import FORMATS, load_compressed, save_compressed, stack_sizes
from ._lowrank import LowRankConfig, LowRankLinear, LowRankWeight, compress_lowrank, thin_linears
from ._rtn_choice import prime
from ._sparse import PruneConfig, SparseWeight
from ._warmup import warm_up
from .armor import ARMOR
from .asvd import ASVD
from .awq import AWQ
from .bcq import BCQ
from .bitstack import BitStack
from .dpruner import DPruner, dpruner_compress
from .dsnot import DSnoT
from .fwsvd import FWSVD
from .gptq import GPTQ
from .hqq import HQQ
from .magnitude import Magnitude
from .masa import MASA
from .monarch_compress import MonarchCompress
from .pst import PST
from .rtn import RTN
from .sparsegpt import SparseGPT
from .svd import SVD
from .udfc import UDFC
from .wanda import Wanda
from .welore import WeLore, lrc_task

import_methods(__name__, __path__)

__all__ = [
    "ARMOR", "ASVD", "AWQ", "BCQ", "BitStack", "CompressConfig", "CompressReport", "Compressed", "DPruner",
    "DSnoT", "FORMATS", "FWSVD", "GPTQ", "HQQ", "LowRankConfig", "LowRankLinear", "LowRankWeight", "MASA",
    "Magnitude", "MonarchCompress", "PST", "PruneConfig", "RTN", "SVD", "SparseGPT", "SparseWeight", "UDFC",
    "Wanda", "WeLore", "calibration_batches", "check_group_size", "compress", "compress_lowrank",
    "dpruner_compress", "heldout_text", "load_compressed", "lrc_task", "prime", "save_compressed",
    "stack_sizes", "thin_linears", "warm_up",
]  # fmt: skip
