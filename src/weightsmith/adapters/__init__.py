"""Adapters: trainable reparameterisations ``W' = W0 + ΔW`` attached to frozen weights.

Every module in this package whose name does not start with ``_`` is a method file and is imported
here, so writing ``adapters/<method>.py`` with a ``@register_config(name, kind="adapter")`` config
is all it takes to add a method.
"""

from __future__ import annotations

from ..config import import_methods
from ._attach import (
    AdaptedLayer,
    adapt,
    adapted_layers,
    adapter_names,
    adapter_parameters,
    adapter_regularization,
    adapter_step,
    adapters_disabled,
    base_state_dict,
    mark_only_adapters_trainable,
    merge_adapters,
    remove_adapters,
    set_adapters_enabled,
    trainable_parameters,
    unmerge_adapters,
)
from ._core import Adapter, AdapterConfig, AdapterContext, SharedBases
from ._io import load_adapters, save_adapters
from ._peft import export_merged, from_peft, to_peft

__all__ = [
    "AdaptedLayer",
    "Adapter",
    "AdapterConfig",
    "AdapterContext",
    "SharedBases",
    "adapt",
    "adapted_layers",
    "adapter_names",
    "adapter_parameters",
    "adapter_regularization",
    "adapter_step",
    "adapters_disabled",
    "base_state_dict",
    "export_merged",
    "from_peft",
    "load_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "registered_adapters",
    "remove_adapters",
    "save_adapters",
    "set_adapters_enabled",
    "to_peft",
    "trainable_parameters",
    "unmerge_adapters",
]


def registered_adapters() -> dict[str, type]:
    """Every registered adapter config class by method name."""
    from ..config import registered

    return registered("adapter")


import_methods(__name__, __path__)
