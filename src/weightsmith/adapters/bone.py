"""Bone / MiSS: block-wise updates built from one small trainable shard, or a block affine map of W0.

Kang & Yin, "Bone: Block-Affine Adaptation of Large Language Models" (later versions: "DiSHA",
then "MiSS: Matrix Shard Sharing"), 2024, arXiv:2409.15371. Same semantics as PEFT 0.21's ``miss``:

- ``variant="miss"`` (PEFT ``MissConfig`` default): one shard ``D`` [r, out] shared by every r-wide
  column block, ``ΔW[o, i] = D[i mod r, o]`` (a last partial block uses the first rows of D).
  The fast path sums x over its r-wide chunks and multiplies once: ``base_out + (Σ_c x_c) D``.
- ``variant="mini"`` (PEFT ``init_weights="mini"``): ``D`` [r, mini_r] tiled ``out / mini_r`` times
  along the output side, then as "miss".
- ``variant="bat"`` (PEFT ``init_weights="bat"``, the paper's Block Affine Transformation): W0 is cut
  into r×r blocks ``W_ij``; with ``D_i`` [r, r] per output block, ``ΔW_ij = W_ij D_i + D_i``. This
  depends on W0, so ``unmerge`` inverts it: ``W_ij = (W'_ij - D_i)(I + D_i)^-1``.

``D`` starts at zero in every variant (``ΔW = 0``). Trainable numbers per layer: ``r·out`` (miss),
``r·mini_r`` (mini), ``(out / r)·r² = r·out`` (bat). PEFT's default ``r`` is 64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import register_config
from ._core import Adapter, AdapterConfig, AdapterContext, copy_peft


class BoneAdapter(Adapter):
    """Trainable ``miss_block``: [r, out] (miss), [r, mini_r] (mini) or [out/r, r, r] (bat)."""

    def __init__(
        self, shape: tuple[int, ...], variant: str, out_f: int, in_f: int, device: torch.device
    ) -> None:
        super().__init__()
        self.variant, self.out_f, self.in_f = variant, out_f, in_f
        self.miss_block = nn.Parameter(torch.zeros(shape, device=device))

    @property
    def r(self) -> int:
        return self.miss_block.shape[-1] if self.variant == "bat" else self.miss_block.shape[0]

    def shard(self) -> Tensor:
        """The [r, out] shard shared by all column blocks (miss / mini)."""
        D = self.miss_block
        return D.repeat(1, self.out_f // D.shape[1]) if self.variant == "mini" else D

    def _blocks(self, W: Tensor) -> Tensor:
        r = self.r
        return W.reshape(self.out_f // r, r, self.in_f // r, r).permute(0, 2, 1, 3)  # [i, j, r, r] = W_ij

    def _unblocks(self, blocks: Tensor) -> Tensor:
        return blocks.permute(0, 2, 1, 3).reshape(self.out_f, self.in_f)

    def delta(self, W0: Tensor) -> Tensor:
        if self.variant == "bat":
            D = self.miss_block[:, None]  # [out/r, 1, r, r], broadcast over the column blocks j
            return self._unblocks(self._blocks(W0) @ D + D)
        reps = math.ceil(self.in_f / self.r)
        return self.shard().T.repeat(1, reps)[:, : self.in_f]

    def low_rank(self) -> tuple[Tensor, Tensor] | None:
        """miss / mini: ``ΔW = Dᵀ [I_r I_r ...]`` (the identity tiled along the input side); bat: None."""
        if self.variant == "bat":
            return None
        eye = torch.eye(self.r, device=self.miss_block.device, dtype=self.miss_block.dtype)
        return self.shard().T, eye.repeat(1, math.ceil(self.in_f / self.r))[:, : self.in_f]

    def forward(self, x: Tensor, W0: Tensor, base_out: Tensor) -> Tensor:
        if self.variant == "bat":
            return base_out + F.linear(x, self.delta(W0).to(x.dtype))
        r = self.r
        pad = (-x.shape[-1]) % r
        xs = F.pad(x, (0, pad)) if pad else x
        chunks = xs.reshape(*x.shape[:-1], xs.shape[-1] // r, r).sum(-2)
        return base_out + chunks @ self.shard().to(x.dtype)

    def peft_state(self) -> dict[str, Tensor] | None:
        return {"miss_block": self.miss_block.detach().float().contiguous()}  # PEFT MiSS's layout

    def load_peft_state(self, state: Mapping[str, Tensor]) -> None:
        copy_peft(state, {"miss_block": self.miss_block.data})

    def unmerge(self, W_merged: Tensor) -> Tensor:
        if self.variant != "bat":
            return W_merged - self.delta(W_merged)
        D = self.miss_block.double()
        eye = torch.eye(self.r, dtype=D.dtype, device=D.device)
        inv = torch.linalg.inv(eye + D)[:, None]
        W0 = (self._blocks(W_merged.double()) - D[:, None]) @ inv
        return self._unblocks(W0).to(W_merged.dtype)


@register_config("bone", kind="adapter")
class Bone(AdapterConfig):
    """``rank`` r (block size); ``variant``: "miss" (default) | "bat" | "mini"; ``mini_r`` for "mini"."""

    default_lr: ClassVar[float] = 5e-4
    example_opts: ClassVar[dict[str, Any]] = dict(rank=16)
    peft_type: ClassVar[str | None] = "MISS"  # PEFT's name for Bone since 0.17

    rank: int = 64
    variant: str = "miss"
    mini_r: int = 1

    @classmethod
    def from_peft(cls, peft_config: Mapping[str, Any], module: str) -> Bone:
        init = peft_config.get("init_weights", True)
        variant = init if init in ("bat", "mini") else "miss"
        return cls(rank=int(peft_config["r"]), variant=variant, mini_r=int(peft_config.get("mini_r") or 1))

    def to_peft(self) -> dict[str, Any]:
        init: Any = True if self.variant == "miss" else self.variant
        return {"peft_type": "MISS", "r": self.rank, "init_weights": init, "mini_r": self.mini_r}

    def __post_init__(self) -> None:
        if self.variant not in ("miss", "bat", "mini"):
            raise ValueError(f"Bone variant must be 'miss', 'bat' or 'mini', got {self.variant!r}")

    def create(self, W0: Tensor, ctx: AdapterContext) -> BoneAdapter:
        out_f, in_f = W0.shape
        r = self.rank
        if r < 1 or r > in_f:
            raise ctx.error(f"Bone rank {r} is not in 1..{in_f} (in_features)", tuple(W0.shape))
        if self.variant == "bat":
            if out_f % r or in_f % r:
                raise ctx.error(f"Bone 'bat' needs both sides divisible by rank {r}", tuple(W0.shape))
            shape: tuple[int, ...] = (out_f // r, r, r)
        elif self.variant == "mini":
            if self.mini_r < 1 or out_f % self.mini_r:
                raise ctx.error(
                    f"Bone 'mini' needs out_features divisible by mini_r={self.mini_r}", tuple(W0.shape)
                )
            shape = (r, self.mini_r)
        else:
            shape = (r, out_f)
        return BoneAdapter(shape, self.variant, out_f, in_f, W0.device)
