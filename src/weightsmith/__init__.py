"""weightsmith: weight-space engineering for PyTorch models (adapt, merge, compress, analyze)."""

from __future__ import annotations

from .config import config_from_dict, load_config, save_config, to_dict
from .errors import WeightsmithError
from .execute import map_weights
from .select import Selector
from .store import ShardWriter, WeightStore, open_store

__version__ = "0.1.0"

__all__ = [
    "Selector",
    "ShardWriter",
    "WeightStore",
    "WeightsmithError",
    "config_from_dict",
    "load_config",
    "map_weights",
    "open_store",
    "save_config",
    "to_dict",
]
