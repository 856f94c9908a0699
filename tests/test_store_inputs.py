"""Bad safetensors inputs: weightsmith accepts exactly what the safetensors library accepts, and only
files inside the model directory. Every bad file is built by hand (struct + JSON) and checked against
``safetensors.safe_open`` as well as against ``open_store``."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from weightsmith import store as store_mod
from weightsmith.errors import WeightsmithError
from weightsmith.store import INDEX_NAME, open_store

D16 = bytes(range(16))
E = b'{"dtype":"F32","shape":[4],"data_offsets":[0,16]}'  # a valid entry, for headers written by hand


def _blob(header: Any = None, data: bytes = b"", raw: bytes | None = None, pad: bytes = b"") -> bytes:
    h = (raw if raw is not None else json.dumps(header).encode()) + pad
    return struct.pack("<Q", len(h)) + h + data


def _f32(n: int, begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, end]}


def _entry(**kw: Any) -> dict[str, Any]:
    return {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **kw}}


def _library_reads(path: Path) -> bool:
    """True when the safetensors library opens the file and reads every tensor."""
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                f.get_tensor(k)
    except Exception:
        return False
    return True


# (id, file bytes, tensor the message must name or None, does the safetensors library refuse it too?)
# Where the library accepts a file that weightsmith refuses, the comment says why.
BAD: list[tuple[str, bytes, str | None, bool]] = [
    ("header-is-list", _blob([1, 2]), None, True),
    ("header-is-string", _blob("x"), None, True),
    ("header-not-utf8", _blob(raw=b'{"a\xff":' + E + b"}", data=D16), None, True),
    ("header-bom", _blob(raw=b'\xef\xbb\xbf{"a":' + E + b"}", data=D16), None, True),
    ("header-nan", _blob(raw=b'{"a":' + E + b',"b":NaN}', data=D16), None, True),
    ("header-empty", struct.pack("<Q", 0), None, True),
    ("header-nul-padding", _blob(_entry(), D16, pad=b"\0\0"), None, True),
    ("header-too-large", struct.pack("<Q", 100_000_001) + b"{}", None, True),
    ("file-7-bytes", bytes(7), None, True),
    ("entry-int", _blob({"a": 5}), "a", True),
    ("entry-null", _blob({"a": None}), "a", True),
    ("entry-list-of-ints", _blob({"a": [1]}), "a", True),
    # serde also reads a struct from a sequence; no writer produces this, weightsmith refuses it
    ("entry-as-sequence", _blob({"a": ["F32", [4], [0, 16]]}, D16), "a", False),
    ("missing-dtype", _blob({"a": {"shape": [4], "data_offsets": [0, 16]}}, D16), "a", True),
    ("missing-shape", _blob({"a": {"dtype": "F32", "data_offsets": [0, 16]}}, D16), "a", True),
    ("missing-offsets", _blob({"a": {"dtype": "F32", "shape": [4]}}, D16), "a", True),
    ("duplicate-field", _blob(raw=b'{"a":{"dtype":"F32",' + E[1:] + b"}", data=D16), "a", True),
    ("dtype-int", _blob(_entry(dtype=3), D16), "a", True),
    # serde reads an enum variant from a one-key map too; weightsmith refuses it
    ("dtype-as-map", _blob(_entry(dtype={"F32": None}), D16), "a", False),
    ("dtype-unknown", _blob(_entry(dtype="F17"), D16), "a", True),
    ("dtype-lowercase", _blob(_entry(dtype="f32"), D16), "a", True),
    # valid safetensors, but a sub-byte dtype has no one-to-one torch element; refused with a clear message
    ("dtype-sub-byte-F4", _blob(_entry(dtype="F4", shape=[32]), D16), "a", False),
    ("shape-string", _blob(_entry(shape="4"), D16), "a", True),
    ("shape-null", _blob(_entry(shape=None), D16), "a", True),
    ("shape-float", _blob(_entry(shape=[4.0]), D16), "a", True),
    (
        "shape-bool",
        _blob({"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, D16[:1]),
        "a",
        True,
    ),
    ("shape-negative", _blob(_entry(shape=[-4]), D16), "a", True),
    (
        "shape-negative-zero",
        _blob(raw=b'{"a":{"dtype":"F32","shape":[-0,4],"data_offsets":[0,0]}}'),
        "a",
        True,
    ),
    (
        "shape-overflow",
        _blob({"a": {"dtype": "U8", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}}),
        "a",
        True,
    ),
    ("shape-2**64", _blob({"a": {"dtype": "U8", "shape": [2**64, 0], "data_offsets": [0, 0]}}), "a", True),
    # the library parses this header but cannot build the tensor (torch sizes are signed 64-bit)
    (
        "shape-dim-2**63",
        _blob({"a": {"dtype": "U8", "shape": [2**64 - 1, 0], "data_offsets": [0, 0]}}),
        "a",
        True,
    ),
    ("shape-size-mismatch", _blob(_entry(shape=[3]), D16), "a", True),
    ("offsets-three", _blob(_entry(data_offsets=[0, 16, 16]), D16), "a", True),
    ("offsets-one", _blob(_entry(data_offsets=[16]), D16), "a", True),
    ("offsets-null", _blob(_entry(data_offsets=None), D16), "a", True),
    ("offsets-object", _blob(_entry(data_offsets={"0": 0, "1": 16}), D16), "a", True),
    ("offsets-strings", _blob(_entry(data_offsets=["0", "16"]), D16), "a", True),
    ("offsets-float", _blob(_entry(data_offsets=[0, 16.0]), D16), "a", True),
    ("offsets-exponent", _blob(raw=b'{"a":' + E.replace(b"16]", b"16E0]") + b"}", data=D16), "a", True),
    (
        "offsets-bool",
        _blob({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, D16[:1]),
        "a",
        True,
    ),
    ("offsets-negative", _blob(_entry(data_offsets=[-16, 0]), D16), "a", True),
    ("offsets-2**64", _blob(_entry(data_offsets=[0, 2**64 + 16]), D16), "a", True),
    (
        "offsets-reversed",
        _blob({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, D16),
        "a",
        True,
    ),
    ("offsets-overlap", _blob({"a": _f32(4, 0, 16), "b": _f32(2, 8, 16)}, D16), "b", True),
    ("offsets-same-bytes", _blob({"a": _f32(4, 0, 16), "b": _f32(4, 0, 16)}, D16), "b", True),
    ("offsets-gap-at-start", _blob({"a": _f32(2, 8, 16)}, D16), "a", True),
    ("offsets-gap-between", _blob({"a": _f32(1, 0, 4), "b": _f32(2, 8, 16)}, D16), "b", True),
    ("empty-tensor-inside-another", _blob({"a": _f32(4, 0, 16), "z": _f32(0, 8, 8)}, D16), "z", True),
    ("empty-tensor-past-the-end", _blob({"a": _f32(4, 0, 16), "z": _f32(0, 20, 20)}, D16), "z", True),
    # same entry twice: the library keeps the last; a name may appear once
    ("duplicate-name-same-entry", _blob(raw=b'{"a":' + E + b',"a":' + E + b"}", data=D16), "a", False),
    (
        "duplicate-name-other-bytes",
        _blob(raw=b'{"a":' + E + b',"a":' + E.replace(b"[0,16]", b"[16,32]") + b"}", data=D16 + D16),
        "a",
        True,
    ),
    (
        "duplicate-metadata",
        _blob(raw=b'{"__metadata__":{},"__metadata__":{},"a":' + E + b"}", data=D16),
        "__metadata__",
        True,
    ),
    # the library keeps the last of two equal metadata keys; weightsmith refuses the ambiguity
    (
        "duplicate-metadata-key",
        _blob(raw=b'{"__metadata__":{"x":"1","x":"2"},"a":' + E + b"}", data=D16),
        "x",
        False,
    ),
    ("metadata-list", _blob({"__metadata__": [1], **_entry()}, D16), "__metadata__", True),
    ("metadata-int-value", _blob({"__metadata__": {"x": 1}, **_entry()}, D16), "x", True),
    ("metadata-null-value", _blob({"__metadata__": {"x": None}, **_entry()}, D16), "x", True),
    ("truncated", _blob(_entry(), D16[:10]), None, True),
    ("trailing-bytes", _blob(_entry(), D16 + b"xx"), None, True),
    ("no-tensors-trailing-bytes", _blob({}, b"x"), None, True),
]

# Valid files that both readers accept, with the same tensors.
GOOD: list[tuple[str, bytes]] = [
    ("plain", _blob(_entry(), D16)),
    ("extra-entry-field", _blob(_entry(extra=1), D16)),
    ("space-padded-header", _blob(_entry(), D16, pad=b"    ")),
    ("leading-whitespace", _blob(raw=b' {"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}', data=D16)),
    ("metadata-null", _blob({"__metadata__": None, **_entry()}, D16)),
    ("metadata-strings", _blob({"__metadata__": {"format": "pt"}, **_entry()}, D16)),
    ("no-tensors", _blob({})),
    ("zero-size-only", _blob({"z": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}})),
    ("zero-size-first", _blob({"a": _f32(4, 0, 16), "z": _f32(0, 0, 0)}, D16)),
    ("zero-size-last", _blob({"z": _f32(0, 16, 16), "a": _f32(4, 0, 16)}, D16)),
    ("scalar", _blob({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, D16[:4])),
    ("empty-name", _blob({"": _f32(4, 0, 16)}, D16)),
    ("unordered-entries", _blob({"b": _f32(2, 8, 16), "a": _f32(2, 0, 8)}, D16)),
    ("uint16", _blob({"u": {"dtype": "U16", "shape": [8], "data_offsets": [0, 16]}}, D16)),
    (
        "uint32-uint64",
        _blob(
            {
                "u": {"dtype": "U32", "shape": [2], "data_offsets": [0, 8]},
                "v": {"dtype": "U64", "shape": [1], "data_offsets": [8, 16]},
            },
            D16,
        ),
    ),
    ("complex64", _blob({"c": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, D16)),
    ("float8-e8m0", _blob({"e": {"dtype": "F8_E8M0", "shape": [16], "data_offsets": [0, 16]}}, D16)),
    ("bool", _blob({"b": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, bytes([0, 1]))),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_safetensors_is_refused_naming_file_and_tensor(tmp_path: Path, case: tuple) -> None:
    label, blob, tensor, library_refuses = case
    path = tmp_path / f"{label}.safetensors"
    path.write_bytes(blob)
    assert _library_reads(path) is not library_refuses, "the table's claim about safetensors is wrong"
    with pytest.raises(WeightsmithError) as err:
        store = open_store(path)
        for name in store:
            store[name]
    message = str(err.value)
    assert str(path) in message
    if tensor is not None:
        assert f"'{tensor}'" in message, message


@pytest.mark.parametrize("case", GOOD, ids=[c[0] for c in GOOD])
def test_valid_safetensors_reads_like_the_library(tmp_path: Path, case: tuple) -> None:
    label, blob = case
    path = tmp_path / f"{label}.safetensors"
    path.write_bytes(blob)
    store = open_store(path)
    with safe_open(str(path), "pt") as f:
        assert set(store) == set(f.keys())
        for name in f.keys():  # noqa: SIM118
            want = f.get_tensor(name)
            got = store[name]
            assert store.meta(name).shape == tuple(want.shape) and got.dtype == want.dtype
            assert got.shape == want.shape
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))


def test_zero_size_tensor_streams_through_map_weights(tmp_path: Path) -> None:
    """A [0, 4] tensor opens, reads as an empty tensor and passes through the executor and the writer."""
    from weightsmith.execute import map_weights
    from weightsmith.store import ShardWriter

    path = tmp_path / "m.safetensors"
    save_file({"empty": torch.zeros(0, 4), "w": torch.ones(2, 3)}, str(path))
    store = open_store(path)
    assert store["empty"].shape == (0, 4) and store["empty"].dtype == torch.float32
    assert store.meta("empty").nbytes == 0
    with ShardWriter(tmp_path / "out") as w:
        map_weights(lambda t: t * 2, store, writer=w)
    out = open_store(tmp_path / "out")
    assert out["empty"].shape == (0, 4) and torch.equal(out["w"], torch.full((2, 3), 2.0))
    assert _library_reads(tmp_path / "out" / "model.safetensors")


def test_zero_size_tensor_merges(tmp_path: Path) -> None:
    """Issue 7: a valid checkpoint with an empty tensor merges (the store never refuses it)."""
    from weightsmith.merge import TaskArithmetic, merge

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file({"empty": torch.zeros(0, 4), "w": torch.full((2, 3), float(i))}, str(paths[-1]))
    out = merge(paths[1:], TaskArithmetic(), tmp_path / "out", base=paths[0])
    merged = open_store(out)
    assert merged["empty"].shape == (0, 4)
    assert torch.equal(merged["w"], torch.full((2, 3), 3.0))


# ---- sharded checkpoints ---------------------------------------------------------------------------------


def _sharded(root: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(root / name))
    (root / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def _record_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every safetensors file weightsmith parses, so a test can assert what was (never) opened."""
    seen: list[Path] = []
    real = store_mod.read_header

    def spy(path: Path) -> tuple[dict[str, Any], int]:
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(store_mod, "read_header", spy)
    return seen


A = {"a": torch.ones(2)}
B = {"b": torch.zeros(3)}


def test_sharded_index_roundtrip(tmp_path: Path) -> None:
    d = _sharded(
        tmp_path / "m",
        {"s1.safetensors": A, "s2.safetensors": B},
        {"a": "s1.safetensors", "b": "s2.safetensors"},
    )
    store = open_store(d)
    assert torch.equal(store["a"], A["a"]) and torch.equal(store["b"], B["b"])


@pytest.mark.parametrize(
    "weight_map, match",
    [
        ([["a", "s1.safetensors"]], "weight_map must be a JSON object"),
        ({"a": 1}, r"weight_map\['a'\] must be a shard file name"),
        ({"a": None}, r"weight_map\['a'\] must be a shard file name"),
        ({"a": ["s1.safetensors"]}, r"weight_map\['a'\] must be a shard file name"),
        (
            {"a": "../outside.safetensors"},
            r"weight_map\['a'\] = '../outside.safetensors' is not a plain file",
        ),
        ({"a": "sub/s1.safetensors"}, r"weight_map\['a'\] = 'sub/s1.safetensors' is not a plain file"),
        ({"a": ".."}, r"weight_map\['a'\] = '..' is not a plain file"),
        ({"a": ""}, r"weight_map\['a'\] = '' is not a plain file"),
        ({}, "lists no tensors"),
    ],
    ids=["list", "int", "null", "list-value", "dotdot", "subdir", "parent", "empty-name", "empty-map"],
)
def test_index_weight_map_must_name_plain_files(
    tmp_path: Path, monkeypatch, weight_map: Any, match: str
) -> None:
    save_file({"a": torch.full((2,), 7.0)}, str(tmp_path / "outside.safetensors"))
    d = _sharded(tmp_path / "m", {"s1.safetensors": A}, weight_map)
    seen = _record_reads(monkeypatch)
    with pytest.raises(WeightsmithError, match=match) as err:
        open_store(d)
    assert INDEX_NAME in str(err.value)
    assert seen == [], "no shard may be opened before the whole index is validated"


def test_index_absolute_path_is_refused(tmp_path: Path, monkeypatch) -> None:
    outside = tmp_path / "outside.safetensors"
    save_file(A, str(outside))
    d = _sharded(tmp_path / "m", {"s1.safetensors": A}, {"a": str(outside)})
    seen = _record_reads(monkeypatch)
    with pytest.raises(WeightsmithError, match=r"weight_map\['a'\] = .* is not a plain file name"):
        open_store(d)
    assert seen == []


def test_index_duplicate_tensor_key_is_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path / "m", {"s1.safetensors": A}, {"a": "s1.safetensors"})
    (d / INDEX_NAME).write_text('{"weight_map": {"a": "s1.safetensors", "a": "s1.safetensors"}}')
    with pytest.raises(WeightsmithError, match="weight_map has the key 'a' twice"):
        open_store(d)


@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe", b"[]", b'{"metadata": {}}'], ids=["json", "utf8", "list", "no-map"]
)
def test_index_that_is_not_an_index_is_refused(tmp_path: Path, content: bytes) -> None:
    d = _sharded(tmp_path / "m", {"s1.safetensors": A}, {"a": "s1.safetensors"})
    (d / INDEX_NAME).write_bytes(content)
    with pytest.raises(WeightsmithError, match=INDEX_NAME.replace(".", r"\.")):
        open_store(d)


def test_shard_symlink_escaping_the_directory_is_refused(tmp_path: Path, monkeypatch) -> None:
    outside = tmp_path / "secret.safetensors"
    save_file(A, str(outside))
    d = _sharded(tmp_path / "m", {}, {"a": "s1.safetensors"})
    (d / "s1.safetensors").symlink_to(outside)
    seen = _record_reads(monkeypatch)
    with pytest.raises(
        WeightsmithError,
        match="s1.safetensors: resolves to .*secret.safetensors, outside the model directory",
    ):
        open_store(d)
    assert seen == []


def test_single_file_symlink_escaping_the_directory_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.safetensors"
    save_file(A, str(outside))
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.safetensors").symlink_to(outside)
    with pytest.raises(WeightsmithError, match="outside the model directory"):
        open_store(d)
    (d / "model.safetensors").unlink()
    (d / "weights.safetensors").symlink_to(outside)
    with pytest.raises(WeightsmithError, match="outside the model directory"):
        open_store(d)


def test_symlink_inside_the_directory_and_hub_snapshot_layout_are_accepted(tmp_path: Path) -> None:
    """A hub cache snapshot links each file to ../../blobs/HASH of the same repository: that is inside."""
    repo = tmp_path / "models--org--m"
    (repo / "blobs").mkdir(parents=True)
    save_file(A, str(repo / "blobs" / "1111"))
    save_file(B, str(repo / "blobs" / "2222"))
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "s1.safetensors").symlink_to(Path("../../blobs/1111"))
    (snap / "s2.safetensors").symlink_to(Path("../../blobs/2222"))
    (snap / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    assert set(open_store(snap)) == {"a", "b"}
    local = tmp_path / "local"
    local.mkdir()
    save_file(A, str(local / "real.safetensors"))
    (local / "model.safetensors").symlink_to("real.safetensors")
    assert torch.equal(open_store(local)["a"], A["a"])


def test_tensor_in_two_shards_is_refused(tmp_path: Path) -> None:
    d = _sharded(
        tmp_path / "m",
        {"s1.safetensors": A, "s2.safetensors": {**A, **B}},
        {"a": "s1.safetensors", "b": "s2.safetensors"},
    )
    with pytest.raises(
        WeightsmithError, match="tensor 'a' is stored twice, in s1.safetensors and s2.safetensors"
    ):
        open_store(d)


def test_index_tensor_missing_from_its_shard_is_refused(tmp_path: Path) -> None:
    d = _sharded(
        tmp_path / "m",
        {"s1.safetensors": A, "s2.safetensors": B},
        {"a": "s1.safetensors", "b": "s2.safetensors", "c": "s2.safetensors"},
    )
    with pytest.raises(
        WeightsmithError,
        match="lists tensor 'c' in shard s2.safetensors, but s2.safetensors does not contain it",
    ):
        open_store(d)
    d2 = _sharded(
        tmp_path / "m2",
        {"s1.safetensors": A, "s2.safetensors": B},
        {"a": "s2.safetensors", "b": "s1.safetensors"},
    )
    with pytest.raises(
        WeightsmithError, match="lists tensor 'a' in shard s2.safetensors.*it is in s1.safetensors"
    ):
        open_store(d2)


def test_shard_tensor_missing_from_the_index_is_refused(tmp_path: Path) -> None:
    d = _sharded(tmp_path / "m", {"s1.safetensors": {**A, **B}}, {"a": "s1.safetensors"})
    with pytest.raises(
        WeightsmithError, match="shard s1.safetensors holds tensor 'b', which the index does not list"
    ):
        open_store(d)


def test_missing_shard_and_corrupt_shard_are_named(tmp_path: Path) -> None:
    d = _sharded(tmp_path / "m", {"s1.safetensors": A}, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(WeightsmithError, match="lists shard s2.safetensors, which is missing"):
        open_store(d)
    (d / "s2.safetensors").write_bytes(_blob({"b": _f32(4, 4, 20)}, D16 + D16[:4]))
    with pytest.raises(WeightsmithError, match="s2.safetensors: tensor 'b' starts at byte 4"):
        open_store(d)


def test_unindexed_directory_with_a_tensor_in_two_files_is_refused(tmp_path: Path) -> None:
    save_file(A, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.zeros(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(
        WeightsmithError, match="tensor 'a' is stored twice, in x.safetensors and y.safetensors"
    ):
        open_store(tmp_path)


# ---- torch pickles -----------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this object creates a marker file: it stands for any code a hostile pickle would run."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_malicious_torch_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "x": _Payload(str(marker))}, bad)
    with pytest.raises(WeightsmithError, match="pytorch_model.bin: cannot load as a weights-only"):
        open_store(bad)
    with pytest.raises(WeightsmithError, match="weights-only"):
        open_store(tmp_path)
    assert not marker.exists(), "the pickle's payload ran"
    torch.load(bad, weights_only=False)  # the payload is live: an unsafe load does run it
    assert marker.exists()
    os.unlink(marker)


def test_messages_quote_user_values_in_short(tmp_path: Path) -> None:
    """A hostile header cannot blow up an error message: user values are quoted only in part."""
    path = tmp_path / "long.safetensors"
    path.write_bytes(_blob({"a": {"dtype": "F32", "shape": [1.5] * 100_000, "data_offsets": [0, 0]}}))
    with pytest.raises(
        WeightsmithError, match=r"tensor 'a': shape \[1.5, 1.5, .* \.\.\. is not a list"
    ) as err:
        open_store(path)
    assert len(str(err.value)) < 300 + len(str(path))
