"""The train job's optimisers: gradient transforms (optax style), projectors, the GaLore family, APOLLO.

``configs`` registers the ``weightsmith train --optimizer NAME`` configs (kind ``"optimizer"``).
"""

from . import configs
from .apollo import APOLLOAdamW, ChannelScale
from .galore import GaLoreAdamW, galore_param_groups
from .layerwise import is_layerwise, layerwise
from .optimizer import TransformOptimizer
from .projection import LowRank, galore_adam
from .projectors import DCT, SVD, Quantized, RandomizedSVD, RandomProjection, make_projector
from .transform import (
    Chain,
    Masked,
    ScaleByAdam,
    Transform,
    chain,
    identity,
    is_matrix,
    masked,
    scale_by_adam,
    state_bytes,
)

__all__ = [
    "DCT",
    "SVD",
    "APOLLOAdamW",
    "Chain",
    "ChannelScale",
    "GaLoreAdamW",
    "LowRank",
    "Masked",
    "Quantized",
    "RandomProjection",
    "RandomizedSVD",
    "ScaleByAdam",
    "Transform",
    "TransformOptimizer",
    "chain",
    "configs",
    "galore_adam",
    "galore_param_groups",
    "identity",
    "is_layerwise",
    "is_matrix",
    "layerwise",
    "make_projector",
    "masked",
    "scale_by_adam",
    "state_bytes",
]
