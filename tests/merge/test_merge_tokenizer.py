"""mergekit's tokenizer keys (``tokenizer_source``, the ``tokenizer:`` block, ``chat_template``) against
mergekit 0.1.5 itself, on tiny Llamas whose BPE vocabularies differ (built here, no downloads).

mergekit numbers the union's new tokens in a random (hash map) order, so vocabularies are compared as
token -> row: the same tokens, the base's ids unchanged, and every token's row of every token-indexed
tensor equal to mergekit's (1e-5); the other tensors are compared directly.
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from merge_fixtures import cli_app
from safetensors.torch import load_file
from typer.testing import CliRunner

from weightsmith.errors import WeightsmithError
from weightsmith.merge import recipe
from weightsmith.merge._chat_templates import TEMPLATES

pytest.importorskip("mergekit")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch.set_num_threads(1)

CHARS = list("▁abcdefgh")
SPECIAL = ["<unk>", "<s>", "</s>"]


def _tokenizer(chars: list[str], merges: list[tuple[str, str]], added: tuple[str, ...] = ()) -> Any:
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tk = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    tk.decoder = tokenizers.decoders.Metaspace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if added:
        tok.add_special_tokens({"additional_special_tokens": list(added)})
    return tok


def _model(path: Path, tok: Any, seed: int, extra_rows: int = 0) -> str:
    cfg = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=len(tok) + extra_rows,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """a: the base vocabulary; b: two more merges, a new character and an added special token;
    c: a's tokens plus its own special token, its vocab_size padded by 3 rows; d: a's tokenizer."""
    root = tmp_path_factory.mktemp("tok-llamas")
    ta = _tokenizer(CHARS, [("▁", "a"), ("b", "c")])
    tb = _tokenizer([*CHARS, "x"], [("▁", "a"), ("d", "e"), ("x", "x")], ("<|im_start|>",))
    tc = _tokenizer(CHARS, [("▁", "a"), ("b", "c")], ("<|im_end|>",))
    return {
        "a": _model(root / "a", ta, 0),
        "b": _model(root / "b", tb, 1),
        "c": _model(root / "c", tc, 2, extra_rows=3),
        "d": _model(root / "d", ta, 3),
    }


def _load(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, int], dict]:
    tensors = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    return tensors, tok.get_vocab(), json.loads((out / "config.json").read_text())


def _mergekit(cfg: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    opts = MergeOptions(quiet=True, random_seed=0, write_model_card=False)
    run_merge(MergeConfiguration.model_validate(cfg), str(out), opts)
    return out


def _ours(cfg: dict, out: Path) -> Path:
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    recipe.run(path, out)
    return out


def _assert_same(ours: Path, theirs: Path, base_vocab: dict[str, int]) -> None:
    t_ours, v_ours, c_ours = _load(ours)
    t_mk, v_mk, c_mk = _load(theirs)
    assert set(v_ours) == set(v_mk)
    assert all(v_ours[t] == i for t, i in base_vocab.items() if t in v_mk and v_mk[t] == i)
    assert c_ours["vocab_size"] == c_mk["vocab_size"]
    assert set(t_ours) == set(t_mk)
    n = len(v_ours)
    tokens = sorted(v_ours)
    for name, x in t_ours.items():
        y = t_mk[name]
        assert x.shape == y.shape, name
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            ours_rows = x[[v_ours[t] for t in tokens]]
            their_rows = y[[v_mk[t] for t in tokens]]
            torch.testing.assert_close(ours_rows, their_rows, atol=1e-5, rtol=0, msg=name)
            torch.testing.assert_close(x[n:], y[n:], atol=1e-5, rtol=0, msg=f"{name} padding")
        else:
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0, msg=name)


def _base_vocab(llamas: dict[str, str]) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(llamas["a"]).get_vocab()


def test_union_linear_matches_mergekit(llamas, tmp_path):
    cfg = {
        "merge_method": "linear",
        "base_model": llamas["a"],
        "models": [
            {"model": llamas["a"], "parameters": {"weight": 0.5}},
            {"model": llamas["b"], "parameters": {"weight": 0.3}},
            {"model": llamas["c"], "parameters": {"weight": 0.2}},
        ],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    ours = _ours(cfg, tmp_path / "ours")
    _assert_same(ours, _mergekit(cfg, tmp_path / "mk"), _base_vocab(llamas))
    vocab = transformers.AutoTokenizer.from_pretrained(str(ours)).get_vocab()
    assert {"x", "xx", "de", "<|im_start|>", "<|im_end|>"} <= set(vocab)
    assert len(vocab) == json.loads((ours / "config.json").read_text())["vocab_size"]


def test_token_rules_padding_and_template_match_mergekit(llamas, tmp_path):
    cfg = {
        "merge_method": "ties",
        "base_model": llamas["a"],
        "models": [
            {"model": llamas["b"], "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": llamas["c"], "parameters": {"weight": 0.4, "density": 0.8}},
        ],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 8,
            "tokens": {
                "<|im_start|>": {"source": {"kind": "zero"}},
                "xx": {"source": llamas["b"], "force": True},
                "bc": {"source": {"kind": "model_token", "model": llamas["b"], "token": "b"}, "force": True},
                "<new>": {"source": {"kind": "model_token", "model": llamas["c"], "token_id": 5}},
            },
        },
        "chat_template": "chatml",
        "dtype": "float32",
    }
    ours = _ours(cfg, tmp_path / "ours")
    _assert_same(ours, _mergekit(cfg, tmp_path / "mk"), _base_vocab(llamas))
    tok = transformers.AutoTokenizer.from_pretrained(str(ours))
    assert len(tok) % 8 != 0 and json.loads((ours / "config.json").read_text())["vocab_size"] % 8 == 0
    emb = load_file(str(ours / "model.safetensors"))["model.embed_tokens.weight"]
    c_emb = load_file(str(Path(llamas["c"]) / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb[tok.get_vocab()["<new>"]], c_emb[5])  # every model gets c's row 5: no delta
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("source", ["base", "b"])
def test_base_and_model_source_slerp_matches_mergekit(llamas, tmp_path, source):
    cfg = {
        "merge_method": "slerp",
        "base_model": llamas["a"],
        "slices": [
            {
                "sources": [
                    {"model": llamas["a"], "layer_range": [0, 2]},
                    {"model": llamas["b"], "layer_range": [0, 2]},
                ]
            }
        ],
        "parameters": {"t": [0.2, 0.7]},
        "tokenizer_source": llamas[source] if source == "b" else source,
        "dtype": "float32",
    }
    _assert_same(_ours(cfg, tmp_path / "ours"), _mergekit(cfg, tmp_path / "mk"), _base_vocab(llamas))


def test_chat_template_alone_resaves_the_base_tokenizer(llamas, tmp_path):
    literal = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": llamas["a"],
        "models": [{"model": llamas["d"], "parameters": {"weight": 0.5}}],
        "chat_template": literal,
        "dtype": "float32",
    }
    ours = _ours(cfg, tmp_path / "ours")
    mk = _mergekit(cfg, tmp_path / "mk")
    t_ours, t_mk = (transformers.AutoTokenizer.from_pretrained(str(p)) for p in (ours, mk))
    assert t_ours.get_vocab() == t_mk.get_vocab() and t_ours.chat_template == t_mk.chat_template == literal


def _render(template: str, messages: list[dict], llamas: dict[str, str], prompt: bool) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(llamas["a"])
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)


CONVERSATIONS = [
    [{"role": "user", "content": "hi "}],
    [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ],
]


@pytest.mark.parametrize("name", ["chatml", "mistral"])
def test_named_templates_render_as_mergekits(llamas, name):
    from mergekit._data import chat_templates

    theirs = importlib.resources.files(chat_templates).joinpath(f"{name}.jinja").read_text()
    for conv in CONVERSATIONS:
        for prompt in (False, True):
            assert _render(TEMPLATES[name], conv, llamas, prompt) == _render(theirs, conv, llamas, prompt)


def test_named_templates_render_their_formats(llamas):
    conv = CONVERSATIONS[1]
    assert _render(TEMPLATES["llama3"], conv[:2], llamas, True) == (
        "<s><|start_header_id|>system<|end_header_id|>\n\nbe nice<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert _render(TEMPLATES["alpaca"], conv[:3], llamas, False) == (
        "be nice\n\n### Instruction:\nhi\n\n### Response:\nhello"
    )
    assert _render(TEMPLATES["alpaca"], conv[1:2], llamas, True) == "### Instruction:\nhi\n\n### Response:\n"
    assert _render(TEMPLATES["exaone"], conv[1:3], llamas, True) == (
        "[|system|][|endofturn|]\n[|user|]hi\n[|assistant|]hello[|endofturn|]\n[|assistant|]"
    )


# ------------------------------------------------------------------------------------------- errors


def _cfg(llamas: dict[str, str], **extra: object) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": llamas["a"], "parameters": {"weight": 1.0}}],
        **extra,
    }


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        ({"chat_template": "nonesuch"}, "chat_template"),
        ({"tokenizer": {"tokens": {"x": {"source": {"kind": "other"}}}}}, "tokenizer.tokens['x'].source"),
        ({"tokenizer": {"tokens": {"x": {"force": "yes"}}}}, "tokenizer.tokens['x'].force"),
        ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
        ({"tokenizer": {"source": "union", "extra": 1}}, "'tokenizer'"),
        ({"tokenizer_source": 3}, "tokenizer_source"),
    ],
)
def test_bad_tokenizer_keys_name_the_key(llamas, tmp_path, extra, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_cfg(llamas, **extra)))
    with pytest.raises(WeightsmithError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        recipe.load_recipe(path)


@pytest.mark.parametrize("where", ["nowhere", "a-folder-without-tokenizer"])
def test_missing_tokenizer_source_is_a_user_error(llamas, tmp_path, where):
    """A WeightsmithError from the command: ``weightsmith``'s main turns it into exit code 2."""
    (tmp_path / "a-folder-without-tokenizer").mkdir()
    path = tmp_path / "missing.yaml"
    path.write_text(yaml.safe_dump(_cfg(llamas, tokenizer_source=str(tmp_path / where))))
    res = CliRunner().invoke(cli_app(), ["merge", str(path), str(tmp_path / "out")])
    assert isinstance(res.exception, WeightsmithError), res.output
    assert "tokenizer_source" in str(res.exception) and not (tmp_path / "out").exists()


def test_token_rule_from_a_model_outside_the_merge_names_the_token(llamas, tmp_path):
    cfg = _cfg(llamas, tokenizer={"tokens": {"zz": {"source": llamas["b"]}}})
    with pytest.raises(WeightsmithError, match=r"tokenizer.tokens\['zz'\].source"):
        _ours(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _slerp(llamas: dict[str, str], **extra: object) -> dict:
    srcs = [{"model": llamas[k], "layer_range": [0, 2]} for k in ("a", "d")]
    return {"merge_method": "slerp", "base_model": llamas["a"], "slices": [{"sources": srcs}], **extra}


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("t", r"parameter 't' of tensor .* t=1\.5"),
        ("three", "slerp' takes exactly 2 inputs"),
        ("layers", r"slices\[0\]: every source must span the same number of layers"),
    ],
)
def test_bad_mergekit_yaml_names_the_key(llamas, tmp_path, case, needle):
    cfg = _slerp(llamas, parameters={"t": [0.5, 1.5] if case == "t" else 0.5})
    if case == "three":
        cfg["slices"][0]["sources"].append({"model": llamas["c"], "layer_range": [0, 2]})
    if case == "layers":
        cfg["slices"][0]["sources"][1]["layer_range"] = [0, 1]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = CliRunner().invoke(cli_app(), ["merge", str(path), str(tmp_path / "out")])
    assert isinstance(res.exception, WeightsmithError), res.output
    assert re.search(needle, str(res.exception)), str(res.exception)
    assert not (tmp_path / "out").exists()
