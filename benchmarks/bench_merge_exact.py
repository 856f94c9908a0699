"""mergekit YAMLs with tokenizer keys and ``--exact-dtype`` on SmolLM2-135M: same result as mergekit 0.1.5?
how long does each take?

1. ``tokenizer_source: union``: SmolLM2 merged (linear) with a copy that has two added tokens and their own
   embedding rows (a model whose vocabulary grew during fine-tuning). Checks the output vocabulary and
   that every token's rows equal mergekit's.
2. ``--exact-dtype``: a TIES merge of three bf16 "fine-tunes" (SmolLM2 in bf16 plus Gaussian task
   vectors) with mergekit's bf16 arithmetic: counts bit-identical tensors against mergekit; and the error
   of mergekit's bf16 arithmetic and of our float32 default against the same merge computed in float64.
3. ``merge-moe`` with hidden-state gates: two experts (both SmolLM2, so this shows the routing only)
   with code and story prompts; the same tensors as mergekit-moe, and how often held-out code and story
   prompts are routed to the code expert.

SmolLM2 here is dequantised from a Q4_1 GGUF (docs/assets.md); neither check depends on its quality.

    python benchmarks/bench_merge_exact.py /tmp/bench-exact [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def mergekit(cfg: dict, out: Path, device: str) -> float:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    t0 = time.perf_counter()
    opts = MergeOptions(quiet=True, random_seed=0, write_model_card=False, device=device)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    return time.perf_counter() - t0


def ours(cfg: dict, out: Path, device: str, exact: bool = False) -> float:
    from weightsmith.merge import recipe

    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    recipe.run(path, out, device=device, exact_dtype=exact)
    return time.perf_counter() - t0


def copy_model(src: Path, dst: Path, state: dict[str, torch.Tensor], **config: object) -> str:
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            (dst / f.name).write_bytes(f.read_bytes())
    return str(dst)


def untied(src: Path, root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The packaged SmolLM2 stores only ``lm_head.weight`` (tied); mergekit's Llama definition needs
    ``model.embed_tokens.weight``, so the benchmark's base is a copy holding both."""
    state = tensors(src)
    state["model.embed_tokens.weight"] = state["lm_head.weight"].clone()
    return Path(copy_model(src, root / "smollm2-untied", state, tie_word_embeddings=False)), state


def union_check(root: Path, src: Path, device: str) -> dict:
    import transformers

    src, base = untied(src, root)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    n = len(tok)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    g = torch.Generator().manual_seed(0)
    grown = {}
    for k, v in base.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            extra = v.mean(0, keepdim=True) + 0.02 * torch.randn(2, v.shape[1], generator=g)
            grown[k] = torch.cat([v, extra]) + 0.001 * torch.randn(v.shape[0] + 2, v.shape[1], generator=g)
        else:
            grown[k] = v + 0.001 * torch.randn(v.shape, generator=g)
    ft = copy_model(src, root / "grown", grown, vocab_size=n + 2)
    tok.save_pretrained(ft)
    cfg = {
        "merge_method": "linear",
        "base_model": str(src),
        "models": [
            {"model": str(src), "parameters": {"weight": 0.5}},
            {"model": ft, "parameters": {"weight": 0.5}},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    t_mk = mergekit(cfg, root / "union-mk", device)
    t_ws = ours(cfg, root / "union-ws", device)
    a, b = tensors(root / "union-ws"), tensors(root / "union-mk")
    va = transformers.AutoTokenizer.from_pretrained(str(root / "union-ws")).get_vocab()
    vb = transformers.AutoTokenizer.from_pretrained(str(root / "union-mk")).get_vocab()
    toks = sorted(va)
    diff = 0.0
    for k in a:
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            x, y = a[k][[va[t] for t in toks]], b[k][[vb[t] for t in toks]]
        else:
            x, y = a[k], b[k]
        diff = max(diff, float((x - y).abs().max()))
    return {
        "vocab": len(va),
        "same_vocab": set(va) == set(vb),
        "max_abs_diff": diff,
        "mergekit_s": round(t_mk, 2),
        "weightsmith_s": round(t_ws, 2),
    }


def exact_check(root: Path, src: Path, device: str) -> dict:
    src, state = untied(src, root)
    base = {k: v.to(torch.bfloat16) for k, v in state.items()}
    b = copy_model(src, root / "bf16-base", base, torch_dtype="bfloat16")
    g = torch.Generator().manual_seed(1)
    fts = []
    for i in range(3):
        ft = {
            k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(torch.bfloat16)
            for k, v in base.items()
        }
        fts.append(copy_model(src, root / f"bf16-ft{i}", ft, torch_dtype="bfloat16"))
    cfg = {
        "merge_method": "ties",
        "base_model": b,
        "models": [
            {"model": m, "parameters": {"weight": w, "density": 0.5}}
            for m, w in zip(fts, (0.5, 0.3, 0.7), strict=True)
        ],
        "dtype": "bfloat16",
    }
    t_mk = mergekit(cfg, root / "ties-mk", device)
    t_exact = ours(cfg, root / "ties-exact", device, exact=True)
    t_f32 = ours(cfg, root / "ties-f32", device)
    ours(cfg | {"dtype": "float64"}, root / "ties-f64", device)
    mk, ex, f32, ref = (tensors(root / d) for d in ("ties-mk", "ties-exact", "ties-f32", "ties-f64"))
    same = sum(torch.equal(ex[k], v) for k, v in mk.items())

    def err(x: dict[str, torch.Tensor]) -> float:
        num = sum(float((x[k].double() - ref[k]).abs().sum()) for k in ref)
        return num / sum(float(ref[k].abs().sum()) for k in ref)

    return {
        "tensors": len(mk),
        "bit_identical": same,
        "rel_l1_err_vs_f64_mergekit_bf16": err(mk),
        "rel_l1_err_vs_f64_weightsmith_f32": err(f32),
        "mergekit_s": round(t_mk, 2),
        "weightsmith_exact_s": round(t_exact, 2),
        "weightsmith_f32_s": round(t_f32, 2),
    }


CODE = [
    "def add(a, b):\n    return a + b",
    "import numpy as np\nx = np.zeros(3)",
    "for i in range(10):\n    print(i)",
]
STORY = [
    "Once upon a time there was a princess.",
    "The old man walked slowly to the sea.",
    "She smiled at him.",
]
HELD_CODE = [
    "class Stack:\n    def push(self, x):",
    "while n > 0:\n    n -= 1",
    "return sorted(items, key=len)",
]
HELD_STORY = [
    "The dragon slept under the mountain.",
    "It was a cold winter night.",
    "He never saw his brother again.",
]


def moe_check(root: Path, src: Path, device: str) -> dict:
    """mergekit-moe's hidden gates on SmolLM2 (two experts, both SmolLM2: this shows routing, not a
    better model): same tensors as mergekit-moe, and held-out code prompts go to the code expert more
    often than held-out stories do."""
    import transformers

    from weightsmith.merge import moe

    src, _ = untied(src, root)
    cfg = {
        "base_model": str(src),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(src), "positive_prompts": CODE},
            {"source_model": str(src), "positive_prompts": STORY},
        ],
    }
    path = root / "moe.yaml"
    path.write_text(yaml.safe_dump(cfg))
    # both tools use transformers: import what they use before either is timed
    transformers.AutoTokenizer.from_pretrained(str(src))
    _ = (transformers.LlamaForCausalLM, transformers.MistralConfig, transformers.MixtralConfig)
    t0 = time.perf_counter()
    moe.run(path, root / "moe-ws", device=device, allow_all_same=True)
    t_ws = time.perf_counter() - t0
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    t0 = time.perf_counter()
    build(
        MoEMergeConfig.model_validate(cfg),
        str(root / "moe-mk"),
        MergeOptions(quiet=True),
        device=device,
        allow_all_same=True,
    )
    t_mk = time.perf_counter() - t0
    a, b = tensors(root / "moe-ws"), tensors(root / "moe-mk")
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in b)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root / "moe-ws"), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(root / "moe-ws"))

    def to_code(prompts: list[str]) -> float:
        picks = []
        for p in prompts:
            with torch.no_grad():
                out = model(**tok([p], return_tensors="pt"), output_router_logits=True)
            picks += [float((r.argmax(-1) == 0).float().mean()) for r in out.router_logits]
        return sum(picks) / len(picks)

    return {
        "same_keys": set(a) == set(b),
        "max_abs_diff_vs_mergekit_moe": diff,
        "held_out_code_to_code_expert": round(to_code(HELD_CODE), 3),
        "held_out_story_to_code_expert": round(to_code(HELD_STORY), 3),
        "mergekit_moe_s": round(t_mk, 2),
        "weightsmith_s": round(t_ws, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from weightsmith.models import resolve

    src = resolve("smollm2")
    args.root.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"union": union_check(args.root, src, args.device)}, indent=1), flush=True)
    print(json.dumps({"exact_ties_bf16": exact_check(args.root, src, args.device)}, indent=1), flush=True)
    print(json.dumps({"moe_hidden": moe_check(args.root, src, args.device)}, indent=1), flush=True)


if __name__ == "__main__":
    main()
