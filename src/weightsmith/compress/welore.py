"""WeLore: non-uniform ranks from each matrix's singular-value heavy tail, and fine-tuning of the LRCs only.

Jaiswal, Yin, Zhang, Liu, Zhao, Tian & Wang, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly
Emerge from Low-Rank Gradients", 2024 (arXiv 2407.11239). Matrices whose gradients live in a stable low-rank
subspace develop a heavy tail of small singular values; WeLore cuts each matrix at one *global* threshold
on its min-max normalised spectrum, so matrices with a heavier tail lose more rank:

    σ̃_k = (σ_k − σ_min) / (σ_max − σ_min),     r_ℓ(τ) = max(1, #{k : σ̃_k(W_ℓ) ≥ τ}).

A matrix whose rank drops by more than ``min_ratio`` of its full rank, and whose factors ``U_r Σ_r``,
``V_rᵀ`` are smaller than it (``r (out + in) < out · in``), becomes a **low-rank component (LRC)**; the
others (**N-LRCs**) stay dense and untouched. The authors calibrate ``τ`` by hand to a target rank
reduction (a table per model); here ``τ`` is the smallest threshold at which the stored parameters,
``Σ_LRC r_ℓ (out_ℓ + in_ℓ) + Σ_N-LRC out_ℓ in_ℓ``, fit ``keep`` of the dense ones (they fall as ``τ``
grows, so a search over the normalised singular values finds it exactly).

**LRC fine-tuning** (the paper's Sec. 4: train only the LRC factors, N-LRCs frozen) runs in the existing
``finetune`` loop: :func:`lrc_task` gives a :class:`~weightsmith.tasks.Task` that builds the model from a
``--format weightsmith`` directory (two thin Linears per LRC, :func:`~weightsmith.compress.load_compressed`)
and names the thin LRC layers as the task's trainable part, so ``finetune(task=lrc_task(dir, "hamlet"),
adapter="head", lr=...)`` trains exactly the LRCs (and a classifier's head). :func:`finetune_lrc` does
that and writes the result as a compressed directory again (what ``weightsmith adapt DIR --method lrc``
runs), which ``load_compressed`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import register_config
from ..errors import WeightsmithError
from ..progress import log
from ..tasks import SentenceClassifier, Task, get_task
from ._core import CompressReport, LayerReport
from ._lowrank import LowRankConfig, LowRankLinear, LowRankWeight

if TYPE_CHECKING:
    from ..train import TrainArgs, TrainResult


def normalised_spectrum(S: Tensor) -> Tensor:
    """``(σ − σ_min) / (σ_max − σ_min)`` (all zeros for a flat spectrum), float64."""
    s = S.double()
    span = s.max() - s.min()
    return (s - s.min()) / span if float(span) > 0 else torch.zeros_like(s)


def heavy_tail_ranks(spectra: dict[str, Tensor], tau: float) -> dict[str, int]:
    """``r_ℓ(τ) = max(1, #{k : σ̃_k ≥ τ})`` for every matrix."""
    return {n: max(1, int((normalised_spectrum(S) >= tau).sum())) for n, S in spectra.items()}


def split_lrc(
    ranks: dict[str, int], shapes: dict[str, tuple[int, int]], min_ratio: float
) -> tuple[dict[str, int], int]:
    """``(LRC ranks, stored parameters)``: a matrix is an LRC when its rank falls by more than
    ``min_ratio`` and its factors are smaller than it; every other matrix is stored dense."""
    lrc, stored = {}, 0
    for name, r in ranks.items():
        out_f, in_f = shapes[name]
        full = min(out_f, in_f)
        if (full - r) / full > min_ratio and r * (out_f + in_f) < out_f * in_f:
            lrc[name] = r
            stored += r * (out_f + in_f)
        else:
            stored += out_f * in_f
    return lrc, stored


def welore_threshold(
    spectra: dict[str, Tensor], shapes: dict[str, tuple[int, int]], keep: float, min_ratio: float = 0.0
) -> float:
    """The smallest global ``τ`` whose LRC/N-LRC split stores at most ``keep`` of the dense parameters."""
    budget = keep * sum(o * i for o, i in shapes.values())
    cands = torch.unique(torch.cat([normalised_spectrum(S) for S in spectra.values()] + [torch.zeros(1)]))
    lo, hi = 0, len(cands) - 1  # stored(τ) falls as τ grows; cands[-1] = 1 keeps rank 1 everywhere

    def fits(i: int) -> bool:
        return split_lrc(heavy_tail_ranks(spectra, float(cands[i])), shapes, min_ratio)[1] <= budget

    if not fits(hi):
        least = split_lrc(heavy_tail_ranks(spectra, 1.0), shapes, min_ratio)[1]
        total = sum(o * i for o, i in shapes.values())
        raise WeightsmithError(
            f"welore option keep={keep}: even rank 1 for every low-rank component stores "
            f"{least / total:.3f} of the parameters (min_ratio={min_ratio}); raise keep"
        )
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return float(cands[lo])


@dataclass
class WeLoreReport(CompressReport):
    """A :class:`CompressReport` that also names the N-LRCs (left dense)."""

    dense_layers: list[LayerReport] = field(default_factory=list)


@register_config("welore", kind="compress")
class WeLore(LowRankConfig):
    """WeLore (``keep``: stored-parameter fraction, LRC factors plus dense N-LRCs; ``min_ratio``: the
    rank reduction a matrix needs to become an LRC). ``allocation``/``rank`` do not apply."""

    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.min_ratio < 1.0:
            raise WeightsmithError(f"welore option min_ratio={self.min_ratio}: must be in [0, 1)")
        if self.rank or self.allocation != "global":
            raise WeightsmithError(
                "welore options rank / allocation do not apply: WeLore picks every rank from the "
                "singular-value tail under the keep budget"
            )

    def needs_spectra(self) -> bool:
        return True

    def choose_ranks(
        self, spectra: dict[str, Tensor] | None, shapes: dict[str, tuple[int, int]]
    ) -> dict[str, int]:
        assert spectra is not None  # needs_spectra
        tau = welore_threshold(spectra, shapes, self.keep, self.min_ratio)
        lrc, _ = split_lrc(heavy_tail_ranks(spectra, tau), shapes, self.min_ratio)
        log(f"welore: threshold {tau:.4f}, {len(lrc)} low-rank components, {len(shapes) - len(lrc)} dense")
        return lrc

    def new_report(self, ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> WeLoreReport:
        return WeLoreReport(
            self, dense_layers=[LayerReport(n, s, 0.0) for n, s in shapes.items() if n not in ranks]
        )

    def describe(self, report: CompressReport) -> str:
        dense = report.dense_layers if isinstance(report, WeLoreReport) else []
        ws = [w for w in report.weights.values() if isinstance(w, LowRankWeight)]
        total = sum(r.shape[0] * r.shape[1] for r in [*report.layers, *dense])
        kept = sum(w.params for w in ws) + sum(r.shape[0] * r.shape[1] for r in dense)
        return (
            f"{len(ws)} low-rank components, {len(dense)} dense; {100 * kept / max(total, 1):.1f} % "
            "of the layers' parameters stored"
        )


# ----------------------------------------------------------------------------------- LRC fine-tuning

LRC = "lrc"  # the adapt method name of LRC fine-tuning
LRC_LR = 1e-4  # its default learning rate (LRCs and a classifier's head alike)


@dataclass
class LRCTask(Task):
    """A task whose model is a ``--format weightsmith`` low-rank directory (``model_spec``, loaded by
    :func:`weightsmith.models.load_model` as thin Linears) and whose trainable part is its LRCs (every
    :class:`LowRankLinear`) plus a classifier's head. ``built`` keeps the last model built."""

    built: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    def build(self) -> tuple[nn.Module, Any]:
        net, tok = super().build()
        self.built = net
        return net, tok

    def head(self, model: nn.Module) -> nn.Module:
        parts: dict[str, nn.Module] = {
            n.replace(".", "/"): m for n, m in model.named_modules() if isinstance(m, LowRankLinear)
        }
        if not parts:
            raise WeightsmithError(
                f"{self.model_spec}: no low-rank components to fine-tune (write it with --format weightsmith)"
            )
        if isinstance(model, SentenceClassifier):
            parts["head"] = model.head
        return nn.ModuleDict(parts)


def lrc_task(compressed: str, task: str = "hamlet", **options: Any) -> LRCTask:
    """The task ``task`` on the compressed directory ``compressed`` (``options``: ``get_task``'s)."""
    t = get_task(task, compressed, **options)
    return LRCTask(**dataclasses.asdict(t))


def lrc_parameters(model: nn.Module) -> int:
    """Number of parameters in the LRC factors of a thinned model."""
    return sum(p.numel() for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters())


def _lrc_source(src: Path, compressed: str) -> dict[str, Any]:
    """``compression.json`` of a directory holding low-rank factors in the weightsmith format, or refuse."""
    info_file = src / "compression.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    if info.get("format") != "weightsmith" or not info.get("ranks"):
        raise WeightsmithError(
            f"--method {LRC}: {compressed} holds no low-rank components; write it with weightsmith compress "
            "MODEL --method welore (or svd, fwsvd, asvd) --format weightsmith"
        )
    return info  # type: ignore[no-any-return]


def finetune_lrc(
    compressed: str,
    task: str,
    out: str | Path,
    *,
    force: bool = False,
    resume: bool = False,
    max_examples: int | None = None,
    max_len: int | None = None,
    eval_examples: int | None = None,
    args: TrainArgs | None = None,
    **overrides: Any,
) -> TrainResult:
    """WeLore's LRC fine-tuning (Sec. 4 of the paper): train only the low-rank factors of the
    ``--format weightsmith`` directory ``compressed`` (N-LRCs and everything else frozen; a classifier's
    head trains too) on ``task``, and write ``out`` as a compressed directory of the same layout, which
    :func:`~weightsmith.compress.load_compressed` (and ``load_model``, so ``adapt``/``train`` again) reads.
    ``out`` also holds ``run.json`` (settings and result) and, for classification, ``head.safetensors``.
    ``args``/``overrides``: :class:`~weightsmith.train.TrainArgs` (``lr`` defaults to ``LRC_LR``). Returns
    the :class:`~weightsmith.train.TrainResult`. The run is written once, at the end: no ``resume``."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from ..models import resolve
    from ..staging import check_output, staged_dir
    from ..train import HEAD, finetune, train_args
    from ._format import INFO, WEIGHTS, _state

    if resume:
        raise WeightsmithError(
            f"--resume: --method {LRC} writes its directory once, at the end; start again (with --force)"
        )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise WeightsmithError(f"--method {LRC} runs in one process (not under torchrun)")
    args = train_args(args, **overrides)
    if args.checkpoint_every:
        raise WeightsmithError(f"--checkpoint-every: --method {LRC} writes no checkpoints")
    if args.lr is None:
        args = dataclasses.replace(args, lr=LRC_LR)
    src = resolve(compressed)
    info = _lrc_source(src, compressed)
    check_output(out, force, directory=True)
    t = lrc_task(compressed, task, max_examples=max_examples, max_len=max_len, eval_examples=eval_examples)
    result = finetune(task=t, adapter=HEAD, args=args)
    result.method = LRC
    net = t.built
    assert net is not None  # finetune built it
    backbone = t.backbone(net).cpu().eval()
    record = {**info, "lrc_finetune": {"task": t.name, "source": str(compressed), "lr": args.lr}}
    run = {"model": str(compressed), "task": t.name, "method": LRC, "args": dataclasses.asdict(args)}
    with staged_dir(out, force) as tmp:
        save_file(_state(backbone), str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / WEIGHTS).chmod(0o644)
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                (tmp / name).write_bytes((src / name).read_bytes())
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "run.json").write_text(json.dumps({**run, "result": result.to_dict()}, indent=2) + "\n")
        head = net.head if isinstance(net, SentenceClassifier) else None
        if head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
            save_file(state, str(tmp / "head.safetensors"))
    result.out = str(out)
    return result
