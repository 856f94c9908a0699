"""Robust Weight Signatures: extract, store small, patch in, remove exactly.

Robust Weight Signatures: Gaining Robustness as Easy as Patching Weights? Ruisi Cai, Zhenyu Zhang,
Zhangyang Wang, ICML 2023, arXiv:2302.12480.

Robust and clean fine-tunes of one model "mostly differ in shallow layers", so the signature is the
difference in the first ``k`` layers: ``RWS = theta_robust - theta_clean`` or, given the shared base,
the paper's ``tau_c - proj_{tau_std}(tau_c)`` (``tau = theta - theta_0``; Gram-Schmidt per tensor).
Each matrix (convs flattened to ``out x in*k*k``) is kept as its top-``rank`` singular directions,
``U sqrt(S)`` and ``sqrt(S) V^T``, quantised to ``bits`` with one scale per rank component; vectors
(biases, BatchNorm) are quantised whole. Patching adds ``alpha * RWS`` in float32.

Exact removal: ``(W + a S) - a S`` is not ``W`` bit for bit, so ``apply_signature`` also returns an
undo record, the integer difference between the bit patterns of ``W`` and of ``(W' - a S)`` (almost
always 0 or +-1 ulp, stored as int8 when it fits); ``remove_signature`` adds it back exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..errors import WeightsmithError
from ..linalg import truncated_svd
from ..staging import Staging

_INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@dataclass
class Signature:
    """Quantised codes per tensor: ``{name: {"u"|"v"|"d": int8 codes, "su"|"sv"|"sd": scales}}``."""

    tensors: dict[str, dict[str, Tensor]]
    shapes: dict[str, list[int]]
    meta: dict[str, object] = field(default_factory=dict)

    def dense(self) -> dict[str, Tensor]:
        """The dequantised signature (float32), exactly what patching adds."""
        out = {}
        for name, t in self.tensors.items():
            if "d" in t:
                out[name] = (t["d"].float() * t["sd"]).reshape(self.shapes[name])
            else:
                U, V = t["u"].float() * t["su"], t["v"].float() * t["sv"][:, None]
                out[name] = (U @ V).reshape(self.shapes[name])
        return out

    def nbytes(self) -> int:
        """Stored size: codes at ``bits`` per entry (packed two per byte at 4 bits or fewer), scales fp32."""
        per_code = 0.5 if int(self.meta.get("bits", 8)) <= 4 else 1.0  # type: ignore[call-overload]
        return sum(
            int(-(-x.numel() * per_code // 1)) if x.dtype == torch.int8 else x.numel() * 4
            for t in self.tensors.values()
            for x in t.values()
        )


def shallow_names(state: Mapping[str, Tensor], k: int) -> list[str]:
    """Floating tensors in state order up to (not including) the ``k+1``-th module holding a matrix:
    the first ``k`` layers with their biases and the norms that follow them."""
    seen: list[str] = []
    out = []
    for name, t in state.items():
        if not t.is_floating_point():
            continue
        module = name.rsplit(".", 1)[0]
        if t.dim() >= 2 and module not in seen:
            seen.append(module)
            if len(seen) > k:
                break
        out.append(name)
    return out


def _quantise(x: Tensor, bits: int, dim: int | None) -> tuple[Tensor, Tensor]:
    qmax = 2 ** (bits - 1) - 1
    amax = x.abs().amax() if dim is None else x.abs().amax(dim)
    scale = (amax / qmax).clamp_min(1e-12)
    q = torch.round(x / (scale if dim is None else scale.unsqueeze(dim))).clamp(-qmax, qmax)
    return q.to(torch.int8), scale.float()


def extract_signature(
    robust: Mapping[str, Tensor],
    clean: Mapping[str, Tensor],
    layers: int | Sequence[str] = 1,
    rank: int = 8,
    bits: int = 8,
    base: Mapping[str, Tensor] | None = None,
) -> Signature:
    """The robust signature over the first ``layers`` layers (or these tensor names)."""
    if not 2 <= bits <= 8:
        raise WeightsmithError(f"signature bits must be in 2..8, got {bits}")
    names = shallow_names(clean, layers) if isinstance(layers, int) else list(layers)
    tensors, shapes = {}, {}
    for name in names:
        if name not in robust or name not in clean:
            raise WeightsmithError(f"signature layer '{name}' is missing from the robust or clean weights")
        if base is None:
            delta = robust[name].float() - clean[name].float()
        else:  # tau_c minus its component along tau_std
            tc, ts = robust[name].float() - base[name].float(), clean[name].float() - base[name].float()
            delta = tc - (tc * ts).sum() / (ts * ts).sum().clamp_min(1e-30) * ts
        shapes[name] = list(delta.shape)
        if delta.dim() >= 2:
            U, S, Vh = truncated_svd(
                delta.reshape(delta.shape[0], -1), min(rank, *delta.reshape(delta.shape[0], -1).shape)
            )
            qu, su = _quantise(U * S.sqrt(), bits, 0)
            qv, sv = _quantise(S.sqrt()[:, None] * Vh, bits, 1)
            tensors[name] = {"u": qu, "su": su, "v": qv, "sv": sv}
        else:
            qd, sd = _quantise(delta, bits, None)
            tensors[name] = {"d": qd, "sd": sd.reshape(1)}
    meta: dict[str, object] = {
        "rank": rank,
        "bits": bits,
        "mode": "projected" if base is not None else "robust-minus-clean",
    }
    return Signature(tensors, shapes, meta)


def apply_signature(
    state: Mapping[str, Tensor],
    sig: Signature,
    strength: float = 1.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(patched, undo)``: ``W + strength * RWS`` computed in float32 and cast back to ``W``'s dtype."""
    patched, undo = dict(state), {}
    for name, S in sig.dense().items():
        W = state[name]
        if W.dtype not in _INT_VIEW:
            raise WeightsmithError(f"tensor '{name}' has dtype {W.dtype}; signatures patch floating weights")
        new = (W.float() + strength * S).to(W.dtype)
        back = (new.float() - strength * S).to(W.dtype)
        it = _INT_VIEW[W.dtype]
        diff = W.view(it).long() - back.view(it).long()
        small = diff.abs().max() <= 127 if diff.numel() else True
        undo[name] = diff.to(torch.int8 if small else it)
        patched[name] = new
    return patched, undo


def remove_signature(
    patched: Mapping[str, Tensor], sig: Signature, strength: float, undo: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Subtract ``strength * RWS``; with the undo record of ``apply_signature`` the result is bit-exact."""
    out = dict(patched)
    for name, S in sig.dense().items():
        W = patched[name]
        back = (W.float() - strength * S).to(W.dtype)
        if undo is not None:
            it = _INT_VIEW[W.dtype]
            back = (back.view(it).long() + undo[name].long()).to(it).view(W.dtype)
        out[name] = back
    return out


def save_signature(sig: Signature, path: str | os.PathLike[str], force: bool = False) -> Path:
    """A directory with ``signature.safetensors`` (codes and scales) and ``signature.json``, built under a
    staging name and swapped in whole (``weightsmith.staging``)."""
    pack = int(sig.meta.get("bits", 8)) <= 4  # type: ignore[call-overload]
    flat = {
        f"{name}::{k}": _pack(v) if pack and v.dtype == torch.int8 else v.contiguous()
        for name, t in sig.tensors.items()
        for k, v in t.items()
    }
    with Staging(path, force, directory=True) as staged:
        save_file(flat, str(staged.path / "signature.safetensors"), metadata={"format": "weightsmith-rws"})
        text = json.dumps({"shapes": sig.shapes, "meta": sig.meta}, indent=2)
        (staged.path / "signature.json").write_text(text, encoding="utf-8")
    return Path(path)


def load_signature(path: str | os.PathLike[str]) -> Signature:
    p = Path(path)
    if not (p / "signature.safetensors").is_file() or not (p / "signature.json").is_file():
        raise WeightsmithError(
            f"{p}: not a signature directory (needs signature.safetensors and signature.json)"
        )
    info = json.loads((p / "signature.json").read_text())
    tensors: dict[str, dict[str, Tensor]] = {}
    for key, v in load_file(str(p / "signature.safetensors")).items():
        name, k = key.rsplit("::", 1)
        tensors.setdefault(name, {})[k] = v
    for name, t in tensors.items():  # unpack 4-bit codes back to int8 of the recorded shapes
        shape = info["shapes"][name]
        rank = t["su"].numel() if "su" in t else 0
        want = {"u": (shape[0], rank), "v": (rank, _prod(shape[1:])), "d": (_prod(shape),)}
        for k in ("u", "v", "d"):
            if k in t and t[k].dtype == torch.uint8:
                t[k] = _unpack(t[k], want[k])
    return Signature(tensors, info["shapes"], info.get("meta", {}))


def _prod(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _pack(q: Tensor) -> Tensor:
    """Two signed 4-bit codes per byte (low nibble first)."""
    flat = (q.flatten().to(torch.int16) & 0xF).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.zeros(1, dtype=torch.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack(p: Tensor, shape: tuple[int, ...]) -> Tensor:
    nib = torch.stack([p & 0xF, p >> 4], 1).flatten()[: _prod(shape)].to(torch.int16)
    return torch.where(nib > 7, nib - 16, nib).to(torch.int8).reshape(shape)
