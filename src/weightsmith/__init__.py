"""weightsmith: weight-space engineering for PyTorch models (adapt, train, merge, compress, analyze).

The foundation (stores, selectors, configs, the executor) is imported eagerly; the jobs are imported on
first use, so ``import weightsmith`` stays cheap::

    import weightsmith as ws
    ws.adapt(model, ws.LoRA(rank=8))
    ws.merge(["ft-a", "ft-b"], ws.TIES(density=0.2), "merged", base="base")
    ws.analyze_weights(ws.open_weights("smollm2"))
    ws.compress(model, ws.GPTQ(bits=4, group_size=64), calib=batches)
    opt = ws.GaLoreAdamW(param_groups, lr=1e-3)
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import config_from_dict, load_config, save_config, to_dict
from .errors import WeightsmithError
from .execute import map_weights
from .select import Selector
from .store import ShardWriter, WeightStore, open_store

__version__ = "0.1.0"

_ADAPTER_CONFIGS = {
    "AdaLoRA": "adalora", "Bone": "bone", "Compacter": "compacter", "DoRA": "dora", "EVA": "eva",
    "HRA": "hra", "Hydra": "hydra", "LoLDU": "loldu", "LoRA": "lora", "Monarch": "monarch",
    "NOLA": "nola", "PiSSA": "pissa", "RandLoRA": "randlora", "SLTrain": "sltrain", "SVFit": "svfit",
    "VeRA": "vera", "IA3": "ia3", "LoHa": "loha", "LoKr": "lokr", "OFT": "oft", "BOFT": "boft",
}  # fmt: skip
_LAZY: dict[str, str] = {
    **{name: f"adapters.{module}" for name, module in _ADAPTER_CONFIGS.items()},
    **{name: "adapters" for name in ("adapt", "merge_adapters", "unmerge_adapters", "save_adapters",
                                     "load_adapters", "to_peft", "from_peft", "export_merged",
                                     "trainable_parameters", "adapters_disabled")},
    **{name: "merge" for name in ("merge", "merge_continual", "merge_state_dicts", "TIES", "DARE",
                                  "DARETIES", "TaskArithmetic", "Average", "OPCM", "LoRAMerge")},
    **{name: "merge" for name in ("SLERP", "ModelStock", "merge_loras", "extract_lora")},
    **{name: "analyze" for name in ("analyze_weights", "compare_weights", "text_mnn", "describe",
                                    "distances")},
    **{name: "compress" for name in ("compress", "load_compressed", "save_compressed", "RTN", "GPTQ", "AWQ",
                                     "HQQ", "Magnitude", "Wanda", "SparseGPT", "DSnoT", "SVD", "FWSVD",
                                     "ASVD",
                                     "compress_lowrank", "thin_linears", "Compressed")},
    **{name: "optim" for name in ("GaLoreAdamW", "APOLLOAdamW", "TransformOptimizer", "chain", "masked")},
    "Report": "report",
    "finetune": "train",
    "open_weights": "models",
    "load_model": "models",
    "load_dataset": "assets",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'weightsmith' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "Selector", "ShardWriter", "WeightStore", "WeightsmithError", "config_from_dict", "load_config",
    "map_weights", "open_store", "save_config", "to_dict", *_LAZY,
]  # fmt: skip
