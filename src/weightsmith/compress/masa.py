"""MASA: the attention projections of all layers as linear combinations of shared matrix atoms.

Zhussip, Shopkhoev, Ali & Lefkimmiatis, "Share Your Attention: Transformer Weight Sharing via Matrix-based
Dictionary Learning", AAAI 2026 (arXiv 2508.04581). For one projection type (Q, K, V or O) of ``L``
layers, with ``S < L`` shared atoms ``D_s`` and per-layer coefficients ``c_ℓs``,

    W_ℓ ≈ Ŵ_ℓ = Σ_s c_ℓs D_s,      min_{D, C} Σ_ℓ ‖W_ℓ − Σ_s c_ℓs D_s‖_F².

For a trained model the dictionary-learning objective has a closed-form optimum (the matrix-PCA view the
paper takes for pretrained weights): stack ``vec(W_ℓ)`` as the rows of ``X`` [L, out · in]; with
``X = U Σ Vᵀ`` the atoms are the top ``S`` right singular vectors (``D_s = mat(V_s)``) and the coefficients
``C = U_S Σ_S`` (Eckart-Young on ``X``), so the error is ``Σ_{k>S} σ_k²(X)``. Storage per projection type:
``S · out · in + L · S`` numbers instead of ``L · out · in`` (``keep ≈ S / L``).

Layers are grouped by their name with the block index removed (``model.layers.*.self_attn.q_proj.weight``)
and shape; by default only attention projections are shared (names with ``attn`` or ``attention``).
:func:`atom_linears` swaps each shared Linear for an :class:`AtomLinear` that holds the dictionary as one
``nn.Parameter`` shared by the group, so the model's parameter count really drops; :func:`masa_tensors`
and :func:`masa_layout` are the state-dict layout and the rebuild information for the weightsmith format.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..layers import Layer
from ..linalg import svd
from ..progress import log
from ._core import CompressReport, LayerReport, PlanJob
from ._lowrank import FactoredConfig, check_at_least, check_keep, swap_linears

ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*\.")
BLOCK_INDEX = re.compile(r"\.\d+\.")


@dataclass
class MASAWeight:
    """``Ŵ_ℓ = Σ_s coef[s] · atoms[s]``; ``atoms`` [S, out, in] is one tensor shared by the whole group."""

    atoms: Tensor
    coef: Tensor

    def dequantize(self) -> Tensor:
        return torch.einsum("s,soi->oi", self.coef.to(self.atoms.dtype), self.atoms)


def learn_dictionary(Ws: Sequence[Tensor], atoms: int) -> tuple[Tensor, Tensor]:
    """``(D [S, out, in], C [L, S])`` minimising ``Σ_ℓ ‖W_ℓ − Σ_s C_ℓs D_s‖_F²`` (module docstring)."""
    X = torch.stack([W.float().reshape(-1) for W in Ws])  # [L, out·in]
    U, S, Vh = svd(X)
    D = Vh[:atoms].reshape(atoms, *Ws[0].shape)
    return D.contiguous(), (U[:, :atoms] * S[:atoms]).contiguous()


def group_layers(layers: Sequence[Layer]) -> dict[str, list[Layer]]:
    """Layers by role: the name with its block index replaced by ``*``, plus the shape."""
    groups: dict[str, list[Layer]] = {}
    for ly in layers:
        key = BLOCK_INDEX.sub(".*.", ly.name, count=1) + f" {ly.shape[0]}x{ly.shape[1]}"
        groups.setdefault(key, []).append(ly)
    return groups


@register_config("masa", kind="compress")
class MASA(FactoredConfig):
    """Matrix atoms shared across layers (``keep``: atoms per group as a fraction of its layers,
    ``atoms``: a fixed number of atoms per group, overrides ``keep``). Default targets: the attention
    projections. Data-free."""

    verb: ClassVar[str] = "shared"
    held: ClassVar[str] = "shared atoms"
    stored_as: ClassVar[str] = "each group's atoms once and every layer's coefficients"
    dense_as: ClassVar[str] = "the dense sums"
    keep: float = 0.33
    atoms: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_keep(self.keep, "masa")
        check_at_least("masa", 0, " (0: use keep)", atoms=self.atoms)

    def n_atoms(self, layers_in_group: int) -> int:
        return min(layers_in_group, self.atoms or max(1, round(self.keep * layers_in_group)))

    def check_layers(self, layers: Sequence[Layer]) -> None:
        """Every group must have more layers than atoms, or sharing stores more than it saves."""
        for key, group in group_layers(self.shared_layers(layers)).items():
            if len(group) < 2 or self.n_atoms(len(group)) >= len(group):
                raise WeightsmithError(
                    f"masa: the group {key} has {len(group)} layer(s), {self.n_atoms(len(group))} atom(s); "
                    "sharing needs fewer atoms than layers (lower keep/atoms, or select more blocks)"
                )

    def shared_layers(self, layers: Sequence[Layer]) -> list[Layer]:
        if self.targets is not None:
            return list(layers)
        found = [ly for ly in layers if ATTENTION.search(ly.name)]
        if not found:
            raise WeightsmithError("masa: no attention projections found; name the layers with targets=")
        return found

    def plan(self, job: PlanJob) -> CompressReport:
        layers, device = job.layers, job.device
        report = CompressReport(self)
        for key, group in group_layers(self.shared_layers(layers)).items():
            Ws = [ly.weight().detach().to(device, torch.float32, copy=True) for ly in group]
            D, C = learn_dictionary(Ws, self.n_atoms(len(group)))
            D = D.cpu()
            log(f"  {key}: {len(group)} layers from {D.shape[0]} atoms")
            for i, (ly, W) in enumerate(zip(group, Ws, strict=True)):
                w = MASAWeight(D, C[i].cpu())
                W_hat = w.dequantize()
                ly.write(W_hat)
                err = float((W.cpu() - W_hat).norm() / W.norm().clamp_min(1e-30))
                report.layers.append(LayerReport(ly.name, ly.shape, err))
                report.weights[ly.name] = w
        return report

    def stored_params(self, weights: dict[str, Any]) -> int:
        return masa_params(weights)


def masa_params(weights: dict[str, Any]) -> int:
    """Numbers stored: every distinct dictionary once, plus each layer's coefficients."""
    ws = [w for w in weights.values() if isinstance(w, MASAWeight)]
    dicts = {id(w.atoms): w.atoms.numel() for w in ws}
    return sum(dicts.values()) + sum(w.coef.numel() for w in ws)


class AtomLinear(nn.Module):
    """``y = x (Σ_s coef_s atoms_s)ᵀ + bias``; ``atoms`` is the group's shared ``nn.Parameter``."""

    def __init__(self, atoms: nn.Parameter, coef: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.atoms = atoms
        self.coef = nn.Parameter(coef.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        W = torch.einsum("s,soi->oi", self.coef, self.atoms)
        return F.linear(x, W.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def masa_layout(weights: dict[str, Any]) -> dict[str, list[Any]]:
    """``{weight name: [name of the weight whose module stores the atoms, number of atoms]}`` (JSON)."""
    owner: dict[int, str] = {}
    out: dict[str, list[Any]] = {}
    for name, w in weights.items():
        if isinstance(w, MASAWeight):
            first = owner.setdefault(id(w.atoms), name)
            out[name] = [first, int(w.atoms.shape[0])]
    return out


def atom_linears(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Swap every shared ``nn.Linear`` (by weight name) for an :class:`AtomLinear`, in place.

    ``spec``: :class:`MASAWeight` values (from a report: the real atoms), or :func:`masa_layout`'s lists
    (zero-filled atoms of that size, to load a saved state dict into: the atoms load under the owner's
    ``P.atoms``, the other layers share that parameter). Modules sharing a dictionary share one parameter.
    """
    shared: dict[Any, nn.Parameter] = {}

    def make(name: str, lin: nn.Linear, w: Any) -> nn.Module:
        dtype, device = lin.weight.dtype, lin.weight.device
        if isinstance(w, MASAWeight):
            key: Any = id(w.atoms)
            atoms, coef = w.atoms, w.coef
        else:
            key, n = w[0], int(w[1])
            atoms = torch.zeros(n, *lin.weight.shape, dtype=dtype, device=device)
            coef = torch.zeros(n, dtype=dtype, device=device)
        if key not in shared:
            shared[key] = nn.Parameter(atoms.to(device, dtype).clone())
        if shared[key].shape[1:] != lin.weight.shape:
            raise WeightsmithError(f"'{name}' {tuple(lin.weight.shape)}: its atoms have another shape")
        bias = None if lin.bias is None else lin.bias.detach()
        return AtomLinear(shared[key], coef.to(device, dtype), bias)

    return swap_linears(model, spec, make, "share matrix atoms")


def masa_tensors(path: str, w: MASAWeight, owner: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The weightsmith-format tensors of one shared layer (module ``path``): ``P.coef`` [S], and the
    group's dictionary ``P.atoms`` [S, out, in] when this layer is its owner (:func:`masa_layout`)."""
    out = {f"{path}.coef": w.coef.cpu().to(dtype).contiguous()}
    if owner:
        out[f"{path}.atoms"] = w.atoms.cpu().to(dtype).contiguous()
    return out
