"""Evidence for issue 15's linear-algebra components (docs/components.md).

    python benchmarks/evidence_components.py bases  [--seeds 3] [--examples 1000] [--device cpu]
    python benchmarks/evidence_components.py cur    [--model minilm|smollm2] [--device cpu]
    python benchmarks/evidence_components.py sketch [--device cpu]
    python benchmarks/evidence_components.py cg     [--device cpu]

bases: VeRA / NOLA / RandLoRA on MiniLM, Rotten Tomatoes, with the papers' random bases against
orthogonal ones (same trainable parameters, same lr, same seeds): test accuracy.
cur: per-layer relative reconstruction error of CUR-style column selection (k-DPP / volume sampling,
pivoted-QR, uniform) against truncated SVD at equal parameters, then the model's quality with every
targeted layer replaced (MiniLM: Rotten Tomatoes accuracy of its fine-tuned classifier is not packaged,
so the masked-LM-free measure is the mean cosine of the sentence embeddings to the dense model's;
SmolLM2: held-out Hamlet perplexity).
sketch: PLeaS's least-squares step at realistic sizes (feature matrices of MiniLM's FFN), exact
``lstsq`` against sketch-and-solve and sketch-preconditioned LSQR: time and error.
cg: conjugate gradients on our symmetric positive-definite systems (RegMean's Gram solves, PLeaS's
ridge normal equations): iterations and time to 1e-6 relative residual against a Cholesky solve.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WEIGHTSMITH_PROGRESS", "0")

import torch


def bases(args: argparse.Namespace) -> None:
    from weightsmith.adapters.nola import NOLA
    from weightsmith.adapters.randlora import RandLoRA
    from weightsmith.adapters.vera import VeRA
    from weightsmith.train import finetune

    configs: dict[str, Any] = {
        "vera r=64": lambda b: VeRA(rank=64, basis=b),
        "nola r=8 k=l=256": lambda b: NOLA(rank=8, num_basis_A=256, num_basis_B=256, basis=b),
        "randlora r=32": lambda b: RandLoRA(rank=32, alpha=64.0, basis=b),
    }
    print(f"| method | basis | trainable | test acc % (mean ± sd, {args.seeds} seeds) | per seed | s/run |")
    print("|---|---|---|---|---|---|")
    for label, make in configs.items():
        for basis in ("random", "orthogonal"):
            accs, secs = [], []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                r = finetune(
                    "minilm",
                    "rotten_tomatoes",
                    make(basis),
                    max_examples=args.examples,
                    max_len=64,
                    eval_examples=args.eval_examples or None,
                    epochs=args.epochs,
                    seed=seed,
                    device=args.device,
                )
                secs.append(time.perf_counter() - t0)
                accs.append(100 * float(r.metric))
                params = r.trainable_params
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            per = ", ".join(f"{a:.1f}" for a in accs)
            print(
                f"| {label} | {basis} | {params} | {statistics.mean(accs):.1f} ± {sd:.1f} | {per} | "
                f"{statistics.mean(secs):.0f} |",
                flush=True,
            )


def zoo_bases(args: argparse.Namespace) -> None:
    """The same comparison on the zoo: an MLP (64-256-256-256-10) trained on digits, then adapted (adapters
    on every hidden Linear, frozen base and head) to the rotated digits (variant rot90)."""
    import copy

    from weightsmith import zoo
    from weightsmith.adapters import adapt
    from weightsmith.adapters.nola import NOLA
    from weightsmith.adapters.randlora import RandLoRA
    from weightsmith.adapters.vera import VeRA

    base = zoo.train_model("mlp", zoo.load_task("digits"), seed=0, epochs=30)
    task = zoo.load_task("digits", "rot90")
    before = 100 * zoo.evaluate(base, task.x_test, task.y_test)[1]
    print(f"base model on digits-rot90 before adaptation: {before:.1f} %, {args.epochs} epochs of Adam\n")
    configs: dict[str, Any] = {
        "vera r=32": lambda b, s: (VeRA(rank=32, basis=b, seed=s), 3e-2),
        "nola r=4 k=l=64": lambda b, s: (NOLA(rank=4, num_basis_A=64, num_basis_B=64, basis=b, seed=s), 3e-2),
        "randlora r=16": lambda b, s: (RandLoRA(rank=16, alpha=32.0, basis=b, seed=s), 1e-2),
    }
    print(f"| method | basis | trainable | test acc % (mean ± sd, {args.seeds} seeds) | per seed |")
    print("|---|---|---|---|---|")
    for label, make in configs.items():
        for basis in ("random", "orthogonal"):
            accs = []
            for seed in range(args.seeds):
                model = copy.deepcopy(base)
                cfg, lr = make(basis, seed)
                adapt(model, cfg, targets="net.0,net.2,net.4")
                params = sum(p.numel() for p in model.parameters() if p.requires_grad)
                torch.manual_seed(seed)
                opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
                g = torch.Generator().manual_seed(seed)
                model.train()
                for _ in range(args.epochs):
                    order = torch.randperm(len(task.y_train), generator=g)
                    for i in range(0, len(order), 64):
                        idx = order[i : i + 64]
                        loss = torch.nn.functional.cross_entropy(model(task.x_train[idx]), task.y_train[idx])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                model.eval()
                accs.append(100 * zoo.evaluate(model, task.x_test, task.y_test)[1])
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            per = ", ".join(f"{a:.1f}" for a in accs)
            print(
                f"| {label} | {basis} | {params} | {statistics.mean(accs):.1f} ± {sd:.1f} | {per} |",
                flush=True,
            )


def _median_time(fn: Any, repeats: int = 3) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def minilm_features(tokens: int, layer: int = 2) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Real regression problems: (input, output) of MiniLM's FFN layers on ``tokens`` tokens of Hamlet."""
    from weightsmith.compress import heldout_text
    from weightsmith.models import load_model

    model, tok = load_model("minilm")
    ids = tok(heldout_text("hamlet") * 4, return_tensors="pt", truncation=False)["input_ids"][0]
    mods = dict(model.named_modules())
    names = [n for n in mods if n.endswith(f"layer.{layer}.intermediate.dense")]
    names += [n for n in mods if n.endswith(f"layer.{layer}.output.dense")]
    got: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    hooks = [
        mods[n].register_forward_hook(
            lambda _m, i, o, n=n: got[n].append((i[0].flatten(0, 1), o.flatten(0, 1)))
        )
        for n in names
    ]
    with torch.no_grad():
        for start in range(0, tokens, 256):
            chunk = ids[start % (len(ids) - 256) :][:256]
            model(input_ids=chunk[None], attention_mask=torch.ones(1, len(chunk), dtype=torch.long))
    for h in hooks:
        h.remove()
    return {
        ("ffn-in 384->1536" if "intermediate" in n else "ffn-out 1536->384"): (
            torch.cat([a for a, _ in v])[:tokens],
            torch.cat([b for _, b in v])[:tokens],
        )
        for n, v in got.items()
    }


def sketch(args: argparse.Namespace) -> None:
    """PLeaS's Step 2 (ridge 1e-4) on MiniLM features: ``H`` [N, 384] (layer-2 FFN input) -> ``T`` [N, 1536]
    = GELU(intermediate) (a non-linear target, so the least-squares residual is real, as in PLeaS where the
    targets come from other models)."""
    from weightsmith.merge.pleas import least_squares

    print("| N tokens | solver | s | rel. error of W vs exact | residual / exact | √d‖e‖∞/‖e‖₂ (median) |")
    print("|---|---|---|---|---|---|")
    for tokens in args.tokens:
        feats = minilm_features(tokens)
        H, T = feats["ffn-in 384->1536"][0], feats["ffn-out 1536->384"][0]
        H, T = H.to(args.device), T.to(args.device)
        t_ex, (W0, b0) = _median_time(partial(least_squares, H, T, 1e-4), repeats=1)
        r0 = H @ W0.T + b0 - T
        res0 = float(r0.norm())
        rows = [("exact (gelsd)", t_ex, W0, b0)]
        for solver, kind in (
            ("normal", "-"),
            ("sketch", "srht"),
            ("sketch", "countsketch"),
            *([] if args.no_lsqr else [("sketch-lsqr", "countsketch")]),
        ):
            t, (W, b) = _median_time(
                partial(least_squares, H, T, 1e-4, solver, sketch="srht" if kind == "-" else kind), repeats=1
            )
            rows.append((f"{solver} ({kind}, 4(d+1) rows)" if kind != "-" else "normal (Cholesky)", t, W, b))
        for name, t, W, b in rows:
            err = float((W - W0).norm() / W0.norm())
            res = float((H @ W.T + b - T).norm()) / res0
            # how evenly the error spreads over the d coordinates of each output's solution (the ℓ∞
            # guarantee's content): √d ‖e_j‖∞ / ‖e_j‖₂, median over outputs j (1: even, √d: one coordinate)
            e = torch.cat([W - W0, (b - b0)[:, None]], 1).double()
            spread = (e.shape[1] ** 0.5) * e.abs().amax(1) / e.norm(dim=1).clamp_min(1e-300)
            eps = float(spread.median()) if name != "exact (gelsd)" else float("nan")
            print(f"| {tokens} | {name} | {t:.2f} | {err:.2e} | {res:.4f} | {eps:.2f} |", flush=True)


def conjugate_gradients(
    A: torch.Tensor, B: torch.Tensor, tol: float, max_iter: int
) -> tuple[torch.Tensor, int]:
    """Block CG (one step size per column) for SPD ``A X = B``; stops at ``‖r_j‖ ≤ tol ‖b_j‖`` for all j."""
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rr = (R * R).sum(0)
    stop = tol**2 * (B * B).sum(0)
    for it in range(1, max_iter + 1):
        AP = A @ P
        alpha = rr / (P * AP).sum(0)
        X += alpha * P
        R -= alpha * AP
        rr_new = (R * R).sum(0)
        if bool((rr_new <= stop).all()):
            return X, it
        P = R + (rr_new / rr) * P
        rr = rr_new
    return X, max_iter


def cg(args: argparse.Namespace) -> None:
    """Our SPD systems: RegMean's ``(G + λ I) X = G W`` (G = XᵀX / n of MiniLM's FFN inputs, λ = damp ·
    mean diag) and PLeaS's ridge normal equations; CG against a Cholesky solve."""
    print("| system | d | κ | damp | Cholesky s | CG iterations to 1e-6 | CG s | CG rel. error |")
    print("|---|---|---|---|---|---|---|---|")
    for label, (H, _T) in minilm_features(args.tokens[0]).items():
        Hd = H.double().to(args.device)
        G = Hd.T @ Hd / len(Hd)
        d = G.shape[0]
        Wt = torch.randn(d, 256, dtype=torch.float64, device=args.device)
        for damp in (1e-6, 1e-4, 1e-2):
            A = G + damp * float(torch.diagonal(G).mean()) * torch.eye(d, dtype=G.dtype, device=G.device)
            Bm = G @ Wt
            ev = torch.linalg.eigvalsh(A)
            t_ch, X0 = _median_time(lambda A=A, Bm=Bm: torch.cholesky_solve(Bm, torch.linalg.cholesky(A)))
            t_cg, (X, it) = _median_time(partial(conjugate_gradients, A, Bm, 1e-6, 4 * d), repeats=1)
            err = float((X - X0).norm() / X0.norm())
            kappa = float(ev[-1] / ev[0])
            print(
                f"| RegMean Gram, {label} | {d} | {kappa:.1e} | {damp:g} | {t_ch:.3f} | "
                f"{it if it < 4 * d else f'>{it} (cap)'} | "
                f"{t_cg:.2f} | {err:.1e} |",
                flush=True,
            )


def cur_layer_table(args: argparse.Namespace, dev: torch.device) -> None:
    from weightsmith.compress._lowrank import uniform_ranks
    from weightsmith.compress.cur import cur_factors, log_elementary_symmetric
    from weightsmith.layers import find_layers
    from weightsmith.models import load_model

    print(f"Per-layer relative Frobenius error at keep={args.keep} (rank k = keep·out·in/(out+in)):\n")
    print("| model | layers | SVD | CUR volume (k-DPP) | CUR pivoted-QR | volume, theory √E‖·‖² | "
          "s SVD / volume / QR |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for spec in ("minilm", "smollm2"):
        model, _ = load_model(spec, task="causal-lm" if spec == "smollm2" else "auto")
        layers = find_layers(model, select="mlp.down_proj" if spec == "smollm2" else None)[: args.max_layers]
        errs: dict[str, list[float]] = {"svd": [], "volume": [], "pivoted-qr": [], "bound": []}
        secs = dict.fromkeys(("svd", "volume", "pivoted-qr"), 0.0)
        for i, ly in enumerate(layers):
            W = ly.weight().detach().float().to(dev)
            k = uniform_ranks({"w": ly.shape}, args.keep)["w"]
            t0 = time.perf_counter()
            sv = torch.linalg.svdvals(W)
            secs["svd"] += time.perf_counter() - t0
            e_svd = float(sv[k:].norm() / sv.norm())
            errs["svd"].append(e_svd)
            le = log_elementary_symmetric(sv.double() ** 2, k + 1)[:, -1]  # Deshpande et al.'s identity
            errs["bound"].append(float(((k + 1) * (le[k + 1] - le[k]).exp()).sqrt() / sv.norm()))
            for sel in ("volume", "pivoted-qr"):
                t0 = time.perf_counter()
                f = cur_factors(W, k, sel, seed=i)
                secs[sel] += time.perf_counter() - t0
                errs[sel].append(float((W - f.dequantize()).norm() / W.norm()))
        m = {n: statistics.mean(v) for n, v in errs.items()}
        print(
            f"| {spec} | {len(layers)} | {m['svd']:.4f} | {m['volume']:.4f} | {m['pivoted-qr']:.4f} | "
            f"{m['bound']:.4f} | {secs['svd']:.1f} / {secs['volume']:.1f} / {secs['pivoted-qr']:.1f} |",
            flush=True,
        )


def cur(args: argparse.Namespace) -> None:
    """Per-layer error of CUR (volume / pivoted-QR) vs truncated SVD at equal rank on MiniLM's and
    SmolLM2's weights, then SmolLM2's held-out perplexity with ``--targets`` layers replaced."""
    import copy

    from _evidence import heldout_perplexity

    from weightsmith.compress import compress
    from weightsmith.compress.cur import CUR
    from weightsmith.compress.svd import SVD
    from weightsmith.models import load_model

    dev = torch.device(args.device)
    if "layers" in args.parts:
        cur_layer_table(args, dev)
    if "model" not in args.parts:
        return
    base, tok = load_model("smollm2", task="causal-lm")
    ppl = heldout_perplexity(tok, dev, args.eval_tokens)
    print(f"\nSmolLM2-135M (dequantised Q4_1 GGUF), layers '{args.targets}' at keep={args.keep} (uniform), "
          f"held-out Hamlet perplexity ({args.eval_tokens} tokens):\n")  # fmt: skip
    print("| method | perplexity | mean layer error | s |")
    print("|---|---|---|---|")
    print(f"| dense | {ppl(base):.2f} | 0 | 0 |", flush=True)
    for label, cfg in (
        ("truncated SVD", SVD(keep=args.keep, allocation="uniform", targets=args.targets)),
        ("CUR volume", CUR(keep=args.keep, allocation="uniform", targets=args.targets)),
        (
            "CUR pivoted-QR",
            CUR(keep=args.keep, allocation="uniform", targets=args.targets, selection="pivoted-qr"),
        ),
    ):
        t0 = time.perf_counter()
        q, report = compress(copy.deepcopy(base), cfg, device=dev)
        t = time.perf_counter() - t0
        e = statistics.mean(r.rel_error for r in report.layers)
        print(f"| {label} | {ppl(q):.2f} | {e:.4f} | {t:.0f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("bases", "zoo-bases", "cur", "sketch", "cg"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--eval-examples", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--keep", type=float, default=0.8)
    ap.add_argument("--targets", default=r"re:layers\.2[6-9]\.mlp\.down_proj")
    ap.add_argument("--max-layers", type=int, default=24)
    ap.add_argument(
        "--parts", default="layers,model", help="cur: layers (per-layer errors), model (perplexity)"
    )
    ap.add_argument("--no-lsqr", action="store_true", help="sketch: leave out sketch-lsqr (slow on a CPU)")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"bases": bases, "zoo-bases": zoo_bases, "sketch": sketch, "cg": cg, "cur": cur}[args.what](args)


if __name__ == "__main__":
    main()
