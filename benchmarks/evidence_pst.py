"""Evidence for PST (learned, ``adapters/pst_adapter.py``) against PST one-shot and magnitude pruning on a
MiniLM sentence classifier, Rotten Tomatoes, one seed, a short run (CPU-sized).

Rows, all at the same ``--sparsity`` of every linear layer of the encoder blocks (per matrix):

- ``lora (dense)``: LoRA (rank ``--rank``) fine-tuned for one epoch, merged: the unpruned reference.
- ``magnitude one-shot``: that model pruned by |W| (``compress`` magnitude, no recovery).
- ``pst one-shot``: that model pruned by PST's one-shot importance (``compress`` pst: |W| plus the low-rank
  + structured fit of the movement score over ``--calib`` training batches).
- ``gradual magnitude + lora``: the ``pst`` adapter with ``data_driven=false`` (cubic sparsity ramp, mask =
  |W0 + s B A|), same epoch, merged.
- ``pst learned``: the ``pst`` adapter (learned B_s A_s + R + C, straight-through), same epoch, merged.

    .venv/bin/python benchmarks/evidence_pst.py --device cpu --out benchmarks/results/pst_minilm_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from weightsmith import adapters
from weightsmith.adapters.lora import LoRA
from weightsmith.adapters.pst_adapter import PST as PSTAdapterConfig
from weightsmith.compress import compress
from weightsmith.compress.magnitude import Magnitude
from weightsmith.compress.pst import PST as PSTOneShot
from weightsmith.staging import write_text
from weightsmith.train.loop import finetune
from weightsmith.train.runs import load_finetuned

SEL = r"re:^encoder\.layer\.\d+\."


class WithLoss(nn.Module):
    """A sentence classifier whose forward returns the cross-entropy (for the one-shot movement score)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> Any:
        return {"loss": nn.functional.cross_entropy(self.net(input_ids, attention_mask).float(), labels)}


def encoder_sparsity(net: nn.Module) -> float:
    ws = [
        m.weight
        for n, m in net.get_submodule("encoder").named_modules()
        if isinstance(m, nn.Linear) and n.startswith("encoder.layer.")
    ]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--score-rank", type=int, default=8)
    ap.add_argument("--examples", type=int, default=2000, help="training examples (one epoch; 0: all)")
    ap.add_argument("--eval", type=int, default=500, help="validation examples (0: all)")
    ap.add_argument("--calib", type=int, default=8, help="batches of 32 for the one-shot movement score")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--learned-only", action="store_true", help="only the 'pst learned' row")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows: list[dict[str, Any]] = []
    common = dict(
        max_examples=a.examples or None,
        eval_examples=a.eval or None,
        epochs=1,
        batch_size=32,
        device=a.device,
    )
    if a.lr is not None:
        common["lr"] = a.lr

    def run(label: str, cfg: Any, tmp: str) -> tuple[nn.Module, Any, Any]:
        t0 = time.perf_counter()
        finetune("minilm", "rotten_tomatoes", cfg, out=Path(tmp) / label, **common)
        net, tok, task = load_finetuned(Path(tmp) / label, device=a.device)
        adapters.merge_adapters(task.backbone(net))
        adapters.remove_adapters(task.backbone(net))  # merged weights stay; plain Linears again
        acc = task.evaluate(net, tok, device=a.device)
        rows.append({"method": label, "sparsity": encoder_sparsity(net), "acc": acc,
                     "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        print(rows[-1], flush=True)
        return net, tok, task

    s = a.sparsity
    with tempfile.TemporaryDirectory() as tmp:
        if not a.learned_only:
            net, tok, task = run("lora (dense)", LoRA(rank=a.rank, alpha=2.0 * a.rank), tmp)
            m = copy.deepcopy(net)
            compress(m.get_submodule("encoder"), Magnitude(sparsity=s, prune_scope="layer", targets=SEL))
            rows.append({"method": "magnitude one-shot", "sparsity": encoder_sparsity(m),
                         "acc": task.evaluate(m, tok, device=a.device)})  # fmt: skip
            print(rows[-1], flush=True)
            task.prepare(tok)
            calib = [b for _, b in zip(range(a.calib), task.batches(0, 1, 32), strict=False)]
            m = copy.deepcopy(net)
            one_shot = PSTOneShot(
                sparsity=s, rank=a.score_rank, targets=r"re:^net\.encoder\.encoder\.layer\.\d+\."
            )
            # layer_gradients hooks need grad-requiring weights (a loaded run has them frozen)
            m.requires_grad_(True)
            compress(WithLoss(m), one_shot, calib=calib)
            rows.append({"method": "pst one-shot", "sparsity": encoder_sparsity(m),
                         "acc": task.evaluate(m, tok, device=a.device)})  # fmt: skip
            print(rows[-1], flush=True)
        opts = dict(sparsity=s, rank=a.rank, alpha=2.0 * a.rank, score_rank=a.score_rank, ramp=0.5)
        if not a.learned_only:
            run("gradual magnitude + lora", PSTAdapterConfig(**opts, data_driven=False), tmp)
        run("pst learned", PSTAdapterConfig(**opts), tmp)
    table = "| method | encoder sparsity | val acc | s |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['method']} | {r['sparsity']:.3f} | {r['acc']:.4f} | {r.get('seconds', '')} |" for r in rows
    )
    print(table)
    if a.out:
        write_text(a.out, json.dumps({"args": vars(a) | {"out": str(a.out)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
