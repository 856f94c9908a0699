"""What the compression evidence scripts share: their common options, ``--table`` handling and the
held-out perplexity they all score with (``weightsmith.evaluate.perplexity`` on Hamlet's last 10 %,
windows of 512 with stride 256). Imported by the scripts beside it (``from _evidence import ...``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from weightsmith.compress import heldout_text
from weightsmith.evaluate import perplexity


def common_args(ap: argparse.ArgumentParser, samples: int, seq_len: int, eval_tokens: int) -> None:
    """--model, --device, --samples, --seq-len, --eval-tokens, --threads, --out and --table."""
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--samples", type=int, default=samples)
    ap.add_argument("--seq-len", type=int, default=seq_len)
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens, help="held-out tokens scored (0 = all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="only print the table of a saved JSON")


def printed_table(args: argparse.Namespace, table: Callable[[Any], str]) -> bool:
    """With ``--table FILE``: print that saved run's table and say so (the script then stops)."""
    if args.table is None:
        return False
    print(table(json.loads(args.table.read_text())))
    return True


def heldout_perplexity(
    tok: Any, device: torch.device, eval_tokens: int, text: str | None = None
) -> Callable[[torch.nn.Module], float]:
    """``ppl(model)``: perplexity on ``text`` (default Hamlet's held-out part), the model moved to ``device``
    for the evaluation and back to the CPU after it."""
    text = heldout_text("hamlet") if text is None else text
    max_tokens = eval_tokens or None

    def ppl(m: torch.nn.Module) -> float:
        m.to(device)
        try:
            with torch.no_grad():
                return perplexity(m, tok, text, window=512, stride=256, max_tokens=max_tokens, device=device)
        finally:
            m.to("cpu")

    return ppl


def load_for(args: argparse.Namespace) -> tuple[Any, Any, torch.device]:
    """``(model, tokenizer, device)`` for a run: ``--threads`` set, ``--model`` loaded as a causal LM."""
    from weightsmith.models import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model, task="causal-lm")
    return model, tok, torch.device(args.device)


def save_rows(rows: list[dict[str, Any]], out: Path | None) -> None:
    """Print the newest row and rewrite ``--out`` with every row so far (a stopped run keeps its rows)."""
    print(rows[-1], flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))
