"""Writing and reading compressed models.

- ``compressed-tensors``: the ``pack-quantized`` layout that ``transformers`` (with the compressed-tensors
  package) and vLLM load. Per quantised ``nn.Linear`` at ``P``: ``P.weight_packed`` (int32; the unsigned
  ``b``-bit codes of every 32 consecutive values densely fill ``b`` words, value ``i`` at bit ``i·b``, low
  bits first), ``P.weight_scale`` [out, groups], ``P.weight_zero_point`` (asymmetric only; the codes packed
  the same way along the output dimension) and ``P.weight_shape``; ``config.json`` carries a
  ``quantization_config`` with ``quant_method: compressed-tensors`` and ``format: pack-quantized``.
  Quantised models only: pruned and low-rank results are refused (``CompressConfig.check_format``).
- ``dense``: the dense weights (dequantised, pruned with zeros in place, or the product ``A B``) as an
  ordinary Hugging Face checkpoint; works for every method.
- ``weightsmith``: read back by :func:`load_compressed` only. Quantised weights: the compressed-tensors
  tensors with a real-valued zero point (HQQ's fractional ``z``). Pruned weights: the bitmask layout
  (``P.weight.compressed`` kept values, ``P.weight.bitmask``, ``P.weight.shape``, ``P.weight.row_offsets``).
  Low-rank weights: the state dict of :func:`~._lowrank.thin_linears` (``P.down.weight`` [r, in],
  ``P.up.weight`` [out, r], the bias as ``P.up.bias``), with every layer's rank in ``compression.json``;
  :func:`load_compressed` rebuilds the two thin Linears, so the loaded model has fewer parameters.
  Shared atoms (MASA): every layer's coefficients ``P.coef`` [S] and each group's dictionary once, as
  ``P.atoms`` [S, out, in] of its first layer (``compression.json``'s ``masa``: weight name -> [owner,
  S]); the loaded layers are :class:`~.masa.AtomLinear` modules sharing one atoms parameter per group.
  Monarch: ``P.R`` [k, b l, p] and ``P.L`` [l, s, k b] (the permutations are fixed by the layout;
  ``monarch``: weight name -> [nblocks, b]), loaded as :class:`~.monarch_compress.MonarchLinear`. A
  factored weight tied to another tensor (``lm_head`` and the embeddings) is refused: its factors cannot
  keep the tie.
  Binary codes (BCQ): ``P.bcq_codes`` (the ``b``-bit codes, bit ``i`` for ``b_i``, packed as above),
  ``P.bcq_alpha`` [out, groups, b] (float16) and ``P.bcq_shape`` (out, in, b, group size); ``b`` may differ
  from layer to layer (mixed bits). BitStack: ``P.bitstack_scale`` [in] and per block ``i``
  ``P.bitstack.i.signs`` (uint8, one bit per weight), ``P.bitstack.i.u``, ``P.bitstack.i.v`` (float16); the
  global stack order and each block's size are in ``compression.json``; ``load_compressed(DIR,
  memory_mb=M)`` reads only the blocks of the top of the stack that fit ``M`` MB (10^6 bytes) in all, and
  the model runs with ``Ŵ = Σ_{loaded i} B_i diag(s)⁻¹``.

Every output directory is complete (config, tokenizer, generation config, ``compression.json``) and is
built in a staging directory (:func:`weightsmith.staging.staged_dir`) swapped in whole.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import to_dict
from ..errors import WeightsmithError
from ..layers import find_layers
from ..progress import log
from ..staging import staged_dir
from ._core import CompressReport
from ._grid import QuantizedWeight
from ._lowrank import LowRankWeight, thin_linears
from ._sparse import SparseWeight, bitmask_tensors, dense_from_bitmask
from .armor import ArmorWeight, armor_tensors, densify_armor
from .bcq import BCQWeight
from .bitstack import BitStackWeight
from .masa import MASAWeight, atom_linears, masa_layout, masa_tensors
from .monarch_compress import MonarchWeight, monarch_linears, monarch_tensors

FORMATS = ("compressed-tensors", "dense", "weightsmith")
WEIGHTS = "model.safetensors"
INFO = "compression.json"
MB = 1e6
_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def pack_codes(q: Tensor, bits: int) -> Tensor:
    """Pack unsigned ``bits``-bit codes [rows, cols] densely into int32 [rows, ceil(cols·bits / 32)]."""
    rows, cols = q.shape
    if bits in (1, 2, 4, 8) and sys.byteorder == "little":
        # whole codes per byte, code j at bit (j mod 8/bits)·bits of byte j·bits/8; four bytes read as one
        # little-endian int32 are then the word the generic loop below builds (a few uint8 passes, no int64)
        per = 8 // bits
        v = torch.nn.functional.pad(q.to(torch.uint8), (0, (-cols) % (32 // bits))).contiguous()
        packed = v[:, 0::per].clone(memory_format=torch.contiguous_format)  # never the caller's memory
        for k in range(1, per):
            packed |= v[:, k::per] << (k * bits)
        return packed.view(torch.int32)
    v = torch.nn.functional.pad(q.to(torch.int64), (0, (-cols) % 32)).view(rows, -1, 32)
    start = torch.arange(32, device=q.device) * bits
    word, off = start // 32, start % 32
    words = torch.zeros(rows, v.shape[1], bits, dtype=torch.int64, device=q.device)
    words.index_add_(2, word, v << off)
    spill = off + bits > 32
    if bool(spill.any()):
        words.index_add_(2, word[spill] + 1, v[..., spill] >> (32 - off[spill]))
    words &= 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)
    return words.view(rows, -1)[:, : -(-cols * bits // 32)].to(torch.int32).contiguous()


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 [rows, words] to unsigned codes [rows, cols] (int64)."""
    rows, n = packed.shape
    w = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, (-n) % bits)).view(rows, -1, bits)
    start = torch.arange(32, device=packed.device) * bits
    word, off = start // 32, start % 32
    mask = (1 << bits) - 1
    v = w[..., word] >> off
    spill = off + bits > 32
    nxt = w[..., (word + 1).clamp_max(bits - 1)] << (32 - off)
    v = torch.where(spill, v | nxt, v) & mask
    return v.reshape(rows, -1)[:, :cols]


def _weights_scheme(report: CompressReport) -> dict[str, Any]:
    c = report.config
    return {
        "num_bits": c.bits,
        "type": "int",
        "symmetric": c.symmetric,
        "strategy": "group" if c.group_size else "channel",
        "group_size": c.group_size or None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
        "block_structure": None,
    }


def quantization_config(model: nn.Module, report: CompressReport) -> dict[str, Any]:
    """The ``quantization_config`` of a compressed-tensors ``pack-quantized`` checkpoint."""
    done = set(report.weights)
    ignore = [ly.path for ly in find_layers(model, kinds=("linear",), heads=True) if ly.name not in done]
    try:
        from compressed_tensors import __version__ as ct_version
    except ImportError:
        ct_version = None
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": _weights_scheme(report),
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": ct_version,
    }


def _quantized_tensors(
    path: str, qw: QuantizedWeight, dtype: torch.dtype, real_zero: bool
) -> dict[str, Tensor]:
    # packed where the codes live (the GPU after a GPU compress): a half to a quarter of the bytes cross. A
    # result that keeps no codes recovers them here, once, from the model's Ŵ (verified; compress/_grid.py)
    out = {
        f"{path}.weight_packed": pack_codes(qw.q, qw.bits).cpu(),
        f"{path}.weight_scale": qw.scale.cpu().to(dtype).contiguous(),
        f"{path}.weight_shape": torch.tensor(list(qw.shape), dtype=torch.int64),
    }
    if real_zero:
        out[f"{path}.weight_zero_point"] = qw.zero.cpu().float().contiguous()
    elif not qw.symmetric:
        out[f"{path}.weight_zero_point"] = pack_codes(
            qw.zero.cpu().round().to(torch.int64).T, qw.bits
        ).T.contiguous()
    return out


def _weightsmith_tensors(
    name: str, path: str, w: Any, state: dict[str, Tensor], dtype: torch.dtype, masa: dict[str, list[Any]]
) -> dict[str, Tensor]:
    """One compressed weight ``name`` (module ``path``) in the weightsmith format (module docstring);
    ``masa``: :func:`~.masa.masa_layout` of the report (which layer stores each dictionary)."""
    if isinstance(w, MASAWeight):
        return masa_tensors(path, w, masa[name][0] == name, dtype)
    if isinstance(w, MonarchWeight):
        return monarch_tensors(path, w, dtype)
    if isinstance(w, QuantizedWeight):
        return _quantized_tensors(path, w, dtype, True)
    if isinstance(w, SparseWeight):
        return bitmask_tensors(name, w, dtype)
    if isinstance(w, ArmorWeight):
        return armor_tensors(name, path, w, dtype)
    if isinstance(w, BCQWeight):
        return {
            f"{path}.bcq_codes": pack_codes(w.codes, w.bits).cpu(),
            f"{path}.bcq_alpha": w.alpha.cpu().half().contiguous(),
            f"{path}.bcq_shape": torch.tensor([*w.codes.shape, w.bits, w.group_size], dtype=torch.int64),
        }
    if isinstance(w, BitStackWeight):
        out = {f"{path}.bitstack_scale": w.scale.cpu().float().contiguous()}
        for i in range(w.levels):
            out[f"{path}.bitstack.{i}.signs"] = w.signs[i].cpu().contiguous()
            out[f"{path}.bitstack.{i}.u"] = w.u[i].cpu().half().contiguous()
            out[f"{path}.bitstack.{i}.v"] = w.v[i].cpu().half().contiguous()
        return out
    if isinstance(w, LowRankWeight):
        out = {f"{path}.down.weight": w.B.cpu().to(dtype).contiguous()}
        out[f"{path}.up.weight"] = w.A.cpu().to(dtype).contiguous()
        bias = state.pop(f"{path}.bias", None)
        if bias is not None:
            out[f"{path}.up.bias"] = bias
        return out
    raise WeightsmithError(f"'{name}': the weightsmith format cannot store a {type(w).__name__}")


def _state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict without tied duplicates (the later name of a shared tensor is dropped)."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, Tensor] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen and t.numel() > 0:
            continue
        seen.add(key)
        out[name] = t.detach().cpu().contiguous()
    return out


def save_compressed(
    model: nn.Module,
    report: CompressReport,
    out: str | Path,
    tokenizer: Any = None,
    format: str = "compressed-tensors",
    force: bool = False,
) -> Path:
    """Write ``model`` (compressed by :func:`~weightsmith.compress.compress`) to the directory ``out``."""
    from safetensors.torch import save_file

    if format not in FORMATS:
        raise WeightsmithError(f"--format {format}: unknown; use one of {', '.join(FORMATS)}")
    report.config.check_format(format)
    layers = {ly.name: ly for ly in find_layers(model, kinds=("linear", "conv1d"), heads=True)}
    if format != "dense":
        conv = [n for n in report.weights if layers[n].kind != "linear"]
        if conv:
            raise WeightsmithError(
                f"--format {format} stores nn.Linear layers only, but '{conv[0]}' is a GPT-2 "
                "Conv1D; use --format dense"
            )
    if format == "compressed-tensors":
        if not report.quantized:
            raise WeightsmithError(
                "--format compressed-tensors holds quantised weights only; use --format dense or weightsmith"
            )
        frac = [n for n, qw in report.weights.items() if not getattr(qw, "integer_zero", True)]
        if frac:
            raise WeightsmithError(
                f"--format compressed-tensors needs integer zero points, but '{frac[0]}' has "
                "fractional ones (hqq with integer_zero=false); use --format weightsmith or dense"
            )
    config = getattr(model, "config", None)
    if config is None:
        raise WeightsmithError("saving needs a Hugging Face model (with .config)")
    info = {
        "format": format,
        "config": to_dict(report.config),
        "bits_per_weight": report.bits_per_weight,
        "seconds": report.seconds,
        "layers": len(report.layers),
    }
    ranks = {n: w.rank for n, w in report.weights.items() if isinstance(w, LowRankWeight)}
    if ranks:
        info["ranks"] = ranks
    stacks = {layers[n].path: w for n, w in report.weights.items() if isinstance(w, BitStackWeight)}
    masa = masa_layout(report.weights)
    if format == "weightsmith":
        _check_untied(model, report)
        if stacks:
            info["stack"] = _stack_info(stacks)
        if masa:
            info["masa"] = masa
        monarch = {n: w.layout for n, w in report.weights.items() if isinstance(w, MonarchWeight)}
        if monarch:
            info["monarch"] = monarch
    if format == "compressed-tensors" and not report.config.symmetric:
        log(
            "note: asymmetric compressed-tensors checkpoints load in vLLM and ws.load_compressed, "
            "but not yet in "
            "transformers (llm-compressor issue #1618); pass symmetric=true for transformers"
        )
    with staged_dir(out, force) as tmp:
        if format == "dense":
            config.architectures = [type(model).__name__]
            model.save_pretrained(tmp)  # type: ignore[operator]
        else:
            state = _state(model)
            dtype = next(model.parameters()).dtype
            for name, w in report.weights.items():
                state.pop(name, None)
                path = layers[name].path
                if format == "weightsmith":
                    state.update(_weightsmith_tensors(name, path, w, state, dtype, masa))
                else:
                    assert isinstance(w, QuantizedWeight)  # report.quantized, checked above
                    state.update(_quantized_tensors(path, w, dtype, False))
            save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / WEIGHTS).chmod(0o644)
            cfg = config.to_dict()
            cfg.pop("quantization_config", None)
            cfg["architectures"] = [type(model).__name__]
            if format == "compressed-tensors":
                cfg["quantization_config"] = quantization_config(model, report)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / INFO).write_text(json.dumps(info, indent=2) + "\n")
    return Path(out)


def _check_untied(model: nn.Module, report: CompressReport) -> None:
    """Refuse a factored weight (low-rank, shared atoms, Monarch) that is tied to another tensor."""
    factored = (LowRankWeight, MASAWeight, MonarchWeight)
    params = dict(model.named_parameters(remove_duplicate=False))
    names: dict[int, list[str]] = {}
    for n, p in params.items():
        names.setdefault(p.untyped_storage().data_ptr(), []).append(n)
    for name, w in report.weights.items():
        if not isinstance(w, factored) or name not in params:
            continue
        ties = [n for n in names[params[name].untyped_storage().data_ptr()] if n != name]
        if ties:
            raise WeightsmithError(
                f"--format weightsmith cannot store '{name}' as {type(w).__name__} factors: it is tied to "
                f"'{ties[0]}', which must stay a dense matrix; leave it out of targets or use --format dense"
            )


def _dequantize_state(state: dict[str, Tensor], bits: int, group_size: int | None, symmetric: bool) -> None:
    for key in [k for k in state if k.endswith(".weight_packed")]:
        path = key[: -len(".weight_packed")]
        out_f, in_f = (int(v) for v in state.pop(f"{path}.weight_shape").tolist())
        q = unpack_codes(state.pop(key), bits, in_f).float()
        scale = state.pop(f"{path}.weight_scale").float()
        zp = state.pop(f"{path}.weight_zero_point", None)
        if zp is None:
            zero = torch.full_like(scale, float(1 << (bits - 1)))
        elif zp.dtype == torch.int32:
            zero = unpack_codes(zp.T.contiguous(), bits, out_f).T.float()
        else:
            zero = zp.float()
        g = group_size or in_f
        W = (q.view(out_f, in_f // g, g) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
        state[f"{path}.weight"] = W.reshape(out_f, in_f)


def _densify_state(state: dict[str, Tensor]) -> None:
    """Pruned weights stored as bitmask tensors back to dense ``P.weight`` tensors, in place."""
    for key in [k for k in state if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        shape = state.pop(f"{name}.shape")
        state.pop(f"{name}.row_offsets", None)
        state[name] = dense_from_bitmask(state.pop(f"{name}.compressed"), state.pop(key), shape)


def _stack_info(stacks: dict[str, BitStackWeight]) -> dict[str, Any]:
    """The global order of the blocks above level 0 (``[module path, level]``, most useful first) and
    each layer's block size in bytes."""
    order = sorted(
        ((w.position[i], p, i) for p, w in stacks.items() for i in range(1, w.levels)), key=lambda t: t[0]
    )
    return {
        "order": [[p, i] for _, p, i in order],
        "block_bytes": {p: w.block_bytes() for p, w in stacks.items()},
        "levels": {p: w.levels for p, w in stacks.items()},
    }


def _nbytes(fh: Any, key: str) -> int:
    sl = fh.get_slice(key)
    n = 1
    for d in sl.get_shape():
        n *= int(d)
    return n * _ITEMSIZE.get(sl.get_dtype(), 4)


def _stack_key(key: str) -> tuple[str, int] | None:
    """``(module path, level)`` of a BitStack block tensor ``P.bitstack.i.{signs,u,v}``, else None."""
    head, sep, tail = key.rpartition(".bitstack.")
    if not sep:
        return None
    level = tail.split(".")[0]
    return (head, int(level)) if level.isdigit() else None


def stack_sizes(path: str | Path) -> list[float]:
    """Sizes (MB, 10^6 bytes) of every loadable prefix of a BitStack directory's stack, smallest first: the
    ``memory_mb`` values at which :func:`load_compressed` takes one more block."""
    from safetensors import safe_open

    info = _read_info(Path(path))
    if "stack" not in info:
        raise WeightsmithError(f"{path}: not a BitStack directory (no stack in {INFO})")
    with safe_open(str(Path(path) / WEIGHTS), "pt") as fh:
        base = sum(_nbytes(fh, k) for k in fh.keys() if (_stack_key(k) or ("", 0))[1] == 0)  # noqa: SIM118
    sizes = [base / MB]
    for p, _ in info["stack"]["order"]:
        base += info["stack"]["block_bytes"][p]
        sizes.append(base / MB)
    return sizes


def _stack_budget(path: Path, info: dict[str, Any], memory_mb: float | None) -> dict[str, int]:
    """Blocks per layer (module path) of the top of the stack that fits ``memory_mb`` (all if None)."""
    stack = info["stack"]
    if memory_mb is None:
        return {p: int(n) for p, n in stack["levels"].items()}
    sizes = stack_sizes(path)
    if memory_mb < sizes[0]:
        raise WeightsmithError(
            f"memory_mb={memory_mb}: {path} needs at least {sizes[0]:.2f} MB (every layer's first block and "
            f"the uncompressed tensors); its stack loads at {sizes[0]:.2f} to {sizes[-1]:.2f} MB"
        )
    taken = sum(1 for s in sizes[1:] if s <= memory_mb)
    levels = {p: 1 for p in stack["levels"]}
    for p, _ in stack["order"][:taken]:
        levels[p] += 1
    return levels


def _rebuild_stack(state: dict[str, Tensor], levels: dict[str, int]) -> None:
    """BitStack tensors back to dense ``P.weight`` (the loaded blocks summed, scaled back), in place."""
    for p, n in levels.items():
        scale = state.pop(f"{p}.bitstack_scale").float()
        W = torch.zeros(0)
        for i in range(n):
            signs = state.pop(f"{p}.bitstack.{i}.signs")
            u, v = state.pop(f"{p}.bitstack.{i}.u").float(), state.pop(f"{p}.bitstack.{i}.v").float()
            block = BitStackWeight(signs.unsqueeze(0), u.unsqueeze(0), v.unsqueeze(0), scale).block(0)
            W = block if i == 0 else W + block
        state[f"{p}.weight"] = W / scale.unsqueeze(0)


def _rebuild_bcq(state: dict[str, Tensor]) -> None:
    """Binary codes and scales back to dense ``P.weight`` tensors, in place."""
    for key in [k for k in state if k.endswith(".bcq_codes")]:
        p = key[: -len(".bcq_codes")]
        out_f, in_f, bits, group = (int(v) for v in state.pop(f"{p}.bcq_shape").tolist())
        codes = unpack_codes(state.pop(key), bits, in_f).to(torch.uint8)
        state[f"{p}.weight"] = BCQWeight(codes, state.pop(f"{p}.bcq_alpha").float(), bits, group).dequantize()


def _read_info(path: Path) -> dict[str, Any]:
    info_file = path / INFO
    if not info_file.is_file():
        raise WeightsmithError(f"{path}: no {INFO}; not a directory written by weightsmith compress")
    return json.loads(info_file.read_text())  # type: ignore[no-any-return]


def load_compressed(
    path: str | Path, dtype: torch.dtype = torch.float32, memory_mb: float | None = None
) -> nn.Module:
    """Load a directory written by :func:`save_compressed` (any format) as a plain ``nn.Module``.

    ``memory_mb``: for a BitStack directory (``--format weightsmith``), load the top of its stack that fits
    this many MB (10^6 bytes) of stored tensors (:func:`stack_sizes` lists the steps); only those blocks
    are read from disk. The model is an ordinary dense one, whatever the size chosen."""
    import transformers
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path = Path(path)
    info = _read_info(path)
    if memory_mb is not None and "stack" not in info:
        raise WeightsmithError(
            f"memory_mb={memory_mb}: {path} holds no BitStack stack; only bitstack output written with "
            "--format weightsmith loads at a chosen size"
        )
    raw = json.loads((path / "config.json").read_text())
    raw.pop("quantization_config", None)
    config = AutoConfig.for_model(**raw)
    archs = raw.get("architectures") or []
    cls: Any = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = AutoModelForCausalLM if any("CausalLM" in a for a in archs) else AutoModel
    if info["format"] == "dense":
        return cls.from_pretrained(path, dtype=dtype).eval()  # type: ignore[no-any-return]
    model = cls.from_config(config) if cls in (AutoModel, AutoModelForCausalLM) else cls(config)
    model = model.to(dtype)
    if info.get("ranks"):
        thin_linears(model, {name: int(r) for name, r in info["ranks"].items()})
    atom_linears(model, info.get("masa", {}))
    monarch_linears(model, info.get("monarch", {}))
    levels = _stack_budget(path, info, memory_mb) if "stack" in info else {}
    with safe_open(str(path / WEIGHTS), "pt") as fh:
        keys = [k for k in fh.keys() if (sk := _stack_key(k)) is None or sk[1] < levels.get(sk[0], 0)]  # noqa: SIM118
        state = {k: fh.get_tensor(k) for k in keys}
    c = info["config"]
    _dequantize_state(state, int(c["bits"]), int(c["group_size"]), bool(c["symmetric"]))
    _densify_state(state)
    densify_armor(state)
    _rebuild_bcq(state)
    _rebuild_stack(state, levels)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    if unexpected:
        raise WeightsmithError(f"{path}: unexpected tensor '{unexpected[0]}' for {type(model).__name__}")
    model.tie_weights()
    shared = model.state_dict()
    ptrs = [t.untyped_storage().data_ptr() for k, t in shared.items() if k not in missing]
    lost = [k for k in missing if shared[k].untyped_storage().data_ptr() not in ptrs]
    if lost:
        raise WeightsmithError(f"{path}: tensor '{lost[0]}' is missing from {WEIGHTS}")
    return model.eval()  # type: ignore[no-any-return]
