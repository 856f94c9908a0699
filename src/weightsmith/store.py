"""WeightStore: a lazy ``name -> Tensor`` mapping; ShardWriter: atomic sharded safetensors output.

A store knows every tensor's shape and dtype without reading it, and reads tensors one at a time
(positioned reads, keeping at most one shard open; ``SafetensorsStore.read_into`` reads any byte range
of a tensor into a caller's buffer, from any thread, for the parallel reads of ``execute.Reader``), so
a checkpoint larger than RAM streams through ``execute.map_weights`` with bounded memory. Headers and
indexes are validated strictly before any tensor is read: a store accepts what the safetensors library
accepts, and only files inside the model directory (see :func:`read_header`, :func:`read_index`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
from abc import abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import staging
from .errors import WeightsmithError, close_names

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "C64": torch.complex64,
    "F8_E8M0": torch.float8_e8m0fnu, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}  # fmt: skip
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_ITEMSIZE = {k: torch.empty((), dtype=v).element_size() for k, v in SAFETENSORS_DTYPES.items()}
SUB_BYTE_DTYPES = ("F4", "F6_E2M3", "F6_E3M2")  # valid safetensors, but not one element per torch element
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_U64 = 2**64


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class WeightStore(Mapping[str, torch.Tensor]):
    """Read-only mapping from weight names to tensors. Subclasses: safetensors, dict, module."""

    source: str = "<weights>"
    metadata: dict[str, str]

    @abstractmethod
    def meta(self, name: str) -> TensorMeta:
        """Shape and dtype of ``name`` without reading its data."""

    def names(self) -> list[str]:
        return list(self)

    def _missing(self, name: str) -> WeightsmithError:
        return WeightsmithError(
            f"{self.source}: no tensor named '{name}'; close names: {close_names(name, list(self))}"
        )

    @staticmethod
    def open(path: str | os.PathLike[str]) -> WeightStore:
        return open_store(path)

    @staticmethod
    def from_state_dict(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> WeightStore:
        return DictStore(state, source)

    @staticmethod
    def from_module(module: torch.nn.Module, source: str | None = None) -> WeightStore:
        return DictStore(module.state_dict(keep_vars=False), source or type(module).__name__)


class DictStore(WeightStore):
    """A store over tensors already in memory (a state dict or a live module's parameters)."""

    def __init__(self, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
        self._state = dict(state)
        self.source = source
        self.metadata = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._state[name].detach()
        except KeyError:
            raise self._missing(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __contains__(self, name: object) -> bool:
        return name in self._state

    def __len__(self) -> int:
        return len(self._state)

    def meta(self, name: str) -> TensorMeta:
        t = self[name]
        return TensorMeta(tuple(t.shape), t.dtype)


class SafetensorsStore(WeightStore):
    """Lazy store over one safetensors file or a sharded set with ``model.safetensors.index.json``.

    Tensors are read with positioned reads into fresh buffers rather than through a memory map, so
    the pages of a shard read earlier never count towards this process's resident memory: peak RSS
    stays at the tensors actually held, however large the checkpoint.
    """

    def __init__(
        self,
        files: list[Path],
        source: str,
        index: Path | None = None,
        weight_map: dict[str, str] | None = None,
    ) -> None:
        self.source = source
        self.files = files
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end byte)
        self._meta: dict[str, TensorMeta] = {}
        self.metadata = {}
        for f in files:
            header, data_start = read_header(f)
            self.metadata.update(header.pop("__metadata__"))
            for name, info in header.items():
                if name in self._where:
                    raise WeightsmithError(
                        f"{source}: tensor '{name}' is stored twice, in {self._where[name][0].name} and "
                        f"{f.name}; a tensor must live in exactly one shard"
                    )
                begin, end = info["data_offsets"]
                self._where[name] = (f, data_start + begin, data_start + end)
                self._meta[name] = TensorMeta(tuple(info["shape"]), SAFETENSORS_DTYPES[info["dtype"]])
        if index is not None and weight_map is not None:
            self._check_index(index, weight_map)
        self._open_path: Path | None = None
        self._handle: Any = None

    def _check_index(self, index: Path, weight_map: dict[str, str]) -> None:
        """Every tensor the index lists is in the shard it names, and every shard tensor is listed."""
        for name, shard in weight_map.items():
            where = self._where.get(name)
            if where is None or where[0].name != shard:
                found = f"; it is in {where[0].name}" if where is not None else ""
                raise WeightsmithError(
                    f"{index}: lists tensor '{name}' in shard {shard}, but {shard} does not contain it{found}"
                )
        for name, (f, _, _) in self._where.items():
            if name not in weight_map:
                raise WeightsmithError(
                    f"{index}: shard {f.name} holds tensor '{name}', which the index does not list; "
                    "the index and its shards disagree"
                )

    def __getitem__(self, name: str) -> torch.Tensor:
        where = self._where.get(name)
        if where is None:
            raise self._missing(name)
        path, begin, end = where
        meta = self._meta[name]
        try:
            if path != self._open_path:
                self.close()
                self._handle = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
                self._open_path = path
            buf = torch.empty(end - begin, dtype=torch.uint8)  # not zero-filled, unlike bytearray
            pread_into(self._handle.fileno(), buf, begin)
        except OSError as exc:
            raise WeightsmithError(f"{path}: cannot read tensor '{name}': {exc}") from exc
        return buf.view(meta.dtype).reshape(meta.shape)

    def span(self, name: str) -> tuple[Path, int, int]:
        """``(file, first byte, end byte)`` of ``name``'s data in its shard."""
        where = self._where.get(name)
        if where is None:
            raise self._missing(name)
        return where

    def read_into(self, name: str, out: torch.Tensor, start: int = 0) -> None:
        """Read bytes ``[start, start + out.numel())`` of ``name``'s data into ``out`` (a contiguous uint8
        CPU tensor, pinned or not): one positioned read straight into the caller's buffer, no copy in
        between. Safe to call from several threads at once (each call opens its own descriptor)."""
        path, begin, end = self.span(name)
        n = out.numel()
        if start < 0 or begin + start + n > end:
            raise ValueError(
                f"bytes [{start}, {start + n}) are outside tensor '{name}' ({end - begin} bytes)"
            )
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                pread_into(fd, out, begin + start)
            finally:
                os.close(fd)
        except OSError as exc:
            raise WeightsmithError(f"{path}: cannot read tensor '{name}': {exc}") from exc

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        self._open_path = None

    def __iter__(self) -> Iterator[str]:
        return iter(self._meta)

    def __contains__(self, name: object) -> bool:
        return name in self._meta

    def __len__(self) -> int:
        return len(self._meta)

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise self._missing(name) from None


def pread_into(fd: int, out: torch.Tensor, offset: int) -> None:
    """Fill the contiguous uint8 CPU tensor ``out`` from ``fd`` at ``offset`` with positioned reads (they
    release the GIL). Loops over short reads: Linux moves at most 2 GiB - 4 KiB per call, so one call
    cannot fill a larger tensor."""
    view = memoryview(out.numpy()).cast("B")  # type: ignore[arg-type]
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"short read ({done} of {len(view)} bytes): the file ends early")
        done += got


class _DuplicateKey(ValueError):
    """A JSON object with the same key twice (Python's json would silently keep the last)."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey("an object has the same key twice")
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _Negative(int):
    """A negative JSON integer: never a valid size or offset. Keeps ``-0`` apart from ``0`` (the
    library's parser reads ``-0`` as a float)."""

    text = ""

    def __repr__(self) -> str:
        return self.text


def _parse_int(text: str) -> int:
    if not text.startswith("-"):
        return int(text)
    value = _Negative(text)
    value.text = text
    return value


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys (raises :class:`_DuplicateKey`)."""
    text = raw.decode("utf-8")
    return json.loads(
        text,
        object_pairs_hook=_unique,
        parse_constant=_refuse_constant,
        parse_int=_parse_int if "-0" in text else None,  # a per-integer hook is slow; only when needed
    )


class _Pairs(list[tuple[str, Any]]):
    """A JSON object kept as its key/value pairs (only to locate a duplicate key for a message)."""


def _find_duplicate(value: Any, trail: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str] | None:
    """``(keys leading to the object, repeated key)`` for the first object with a key twice."""
    if isinstance(value, _Pairs):
        seen: set[str] = set()
        for key, _ in value:
            if key in seen:
                return trail, key
            seen.add(key)
        items = [(trail + (key,), item) for key, item in value]
    elif isinstance(value, list):
        items = [(trail, item) for item in value]
    else:
        return None
    for sub, item in items:
        found = _find_duplicate(item, sub)
        if found is not None:
            return found
    return None


def _duplicate_at(raw: bytes) -> tuple[tuple[str, ...], str]:
    """Where the duplicate key that :func:`_parse_json` refused is (parsing again, slowly)."""
    found = _find_duplicate(json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs))
    return found if found is not None else ((), "?")


def _object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WeightsmithError(f"{where} must be a JSON object, not {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _show(value: Any, limit: int = 60) -> str:
    """A user's JSON value for a message: lists and strings in short, anything else by its type."""
    if not isinstance(value, (list, str)):
        return _json_type(value)
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]} ..."


def _check_entry(path: Path, name: str, entry: Any) -> dict[str, Any]:
    """Validate one tensor entry: ``{"dtype": str, "shape": [uint], "data_offsets": [begin, end]}``."""
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise WeightsmithError(f"{where}: header entry must be a JSON object, not {_json_type(entry)}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise WeightsmithError(f"{where}: header entry lacks '{field}'; the file is corrupt")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str:
        raise WeightsmithError(f"{where}: dtype must be a string, not {_json_type(dtype)}")
    itemsize = _ITEMSIZE.get(dtype)
    if itemsize is None:
        if dtype in SUB_BYTE_DTYPES:
            raise WeightsmithError(f"{where}: sub-byte dtype {dtype} is not supported by weightsmith")
        raise WeightsmithError(
            f"{where}: unknown dtype {_show(dtype)}; safetensors dtypes are {', '.join(SAFETENSORS_DTYPES)}"
        )
    if type(shape) is not list:
        raise WeightsmithError(f"{where}: shape must be a list of non-negative integers, not {_show(shape)}")
    elements = 1
    for d in shape:  # no floats, no booleans, no negatives; the library multiplies in 64 bits
        if type(d) is not int or d < 0:
            raise WeightsmithError(f"{where}: shape {_show(shape)} is not a list of non-negative integers")
        elements *= d
        if elements >= _U64 or d >= 2**63:
            raise WeightsmithError(f"{where}: shape {_show(shape)} is too large")
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or not all(type(v) is int and 0 <= v < _U64 for v in offsets)
    ):
        raise WeightsmithError(
            f"{where}: data_offsets {_show(offsets)} is not a list of two non-negative integers"
        )
    begin, end = offsets
    if end < begin:
        raise WeightsmithError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    if end - begin != elements * itemsize:
        raise WeightsmithError(
            f"{where}: claims shape {_show(shape)} {dtype} ({elements * itemsize} bytes) but spans "
            f"{end - begin} bytes; the file is corrupt"
        )
    return entry


def _check_tiling(path: Path, header: dict[str, Any]) -> int:
    """The tensors' byte ranges, sorted by (begin, end), tile the data section from 0 without gaps or
    overlaps (the safetensors library's rule); returns the data section's length."""
    ranges = sorted((info["data_offsets"][0], info["data_offsets"][1], name) for name, info in header.items())
    pos, previous = 0, ""
    for begin, end, name in ranges:
        if begin < pos:
            raise WeightsmithError(
                f"{path}: tensor '{name}' (bytes {begin}-{end}) overlaps tensor '{previous}' "
                f"(which ends at byte {pos}); the file is corrupt"
            )
        if begin > pos:
            raise WeightsmithError(
                f"{path}: tensor '{name}' starts at byte {begin}, leaving a gap after byte {pos}; "
                "the file is corrupt"
            )
        pos, previous = end, name
    return pos


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header without reading tensor data: ``(header, data_start)``.

    Accepts what the safetensors library (0.4+) accepts and refuses, naming the file and tensor, what
    it refuses: a header that is not a UTF-8 JSON object of at most 100 MB; tensor entries that are
    not objects with a known ``dtype`` string, a ``shape`` list of non-negative integers and two
    non-negative integer ``data_offsets``; byte ranges that, sorted, do not tile the data section
    from 0; a file that ends before or after the data section. Stricter than the library: duplicate
    keys anywhere (the library keeps the last of two equal tensor entries or metadata keys) and its
    serde-only encodings (an entry as a list, a dtype as ``{"F32": null}``) are refused too.
    ``header["__metadata__"]`` is always a ``str -> str`` dict (empty when absent or null).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise WeightsmithError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise WeightsmithError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            text = fh.read(n)
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        doc = _parse_json(text)
    except UnicodeDecodeError as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header: not UTF-8 (byte {exc.start})") from exc
    except _DuplicateKey:
        trail, key = _duplicate_at(text)
        if not trail:
            what = "key" if key == "__metadata__" else "tensor"
            problem = f"{what} '{key}' appears twice in the header"
        elif trail[0] == "__metadata__":
            problem = f"'__metadata__' has the key '{key}' twice"
        else:
            problem = f"tensor '{trail[0]}': header entry has the key '{key}' twice"
        raise WeightsmithError(f"{path}: {problem}; the file is corrupt") from None
    except (ValueError, RecursionError) as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header: {exc}") from exc
    if not isinstance(doc, dict):
        raise WeightsmithError(f"{path}: corrupt safetensors header: not a JSON object but {_json_type(doc)}")
    metadata = _check_metadata(path, doc.pop("__metadata__", None))
    header = {name: _check_entry(path, name, entry) for name, entry in doc.items()}
    end = _check_tiling(path, header)
    if 8 + n + end > size:
        raise WeightsmithError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end}); "
            "re-download or re-save it"
        )
    if 8 + n + end < size:
        raise WeightsmithError(
            f"{path}: {size - 8 - n - end} unexpected bytes after the last tensor; the file is corrupt"
        )
    return {"__metadata__": metadata, **header}, 8 + n


def _check_metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    meta = _object(value, f"{path}: '__metadata__'")
    for key, item in meta.items():
        if type(item) is not str:
            raise WeightsmithError(
                f"{path}: '__metadata__' value of '{key}' must be a string, not {_json_type(item)}"
            )
    return meta


def open_store(path: str | os.PathLike[str]) -> WeightStore:
    """Open weights at ``path``: a safetensors file, a directory (sharded or not), or a torch state dict.

    Inside a directory only files that resolve to inside it are opened (symlinks included), so an
    index or a link can never make weightsmith read a file from elsewhere.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsmithError(f"no such file or directory: {p}")
    if p.is_dir():
        index = p / INDEX_NAME
        if index.is_file():
            _inside(p, index)
            weight_map = read_index(index)
            files = [_inside(p, p / f) for f in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise WeightsmithError(f"{index}: lists shard {f.name}, which is missing")
            return SafetensorsStore(files, str(p), index, weight_map)
        if (p / "model.safetensors").is_file():  # a HF directory may hold other safetensors (heads, adapters)
            return SafetensorsStore([_inside(p, p / "model.safetensors")], str(p))
        files = sorted(p.glob("*.safetensors"))
        if files:
            return SafetensorsStore([_inside(p, f) for f in files], str(p))
        for name in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (p / name).is_file():
                return _torch_state_dict(_inside(p, p / name))
        raise WeightsmithError(f"{p}: no *.safetensors, {INDEX_NAME} or pytorch_model.bin inside")
    if p.suffix == ".safetensors":
        return SafetensorsStore([p], str(p))
    if p.suffix in (".bin", ".pt", ".pth"):
        return _torch_state_dict(p)
    raise WeightsmithError(
        f"{p}: unknown weight format (expected .safetensors, a model directory or .bin/.pt)"
    )


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> plain shard file name.

    Shard names must be file names in the index's own directory: no ``/``, no ``..``, not absolute.
    """
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise WeightsmithError(f"{index}: {index.stat().st_size} bytes is too large for an index")
        doc = _parse_json(index.read_bytes())
    except OSError as exc:
        raise WeightsmithError(f"{index}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise WeightsmithError(
            f"{index}: not a valid safetensors index: not UTF-8 (byte {exc.start})"
        ) from exc
    except _DuplicateKey:
        trail, key = _duplicate_at(index.read_bytes())
        where = "the index" if not trail else trail[-1]
        raise WeightsmithError(f"{index}: {where} has the key '{key}' twice") from None
    except (ValueError, RecursionError) as exc:
        raise WeightsmithError(f"{index}: not a valid safetensors index: {exc}") from exc
    top = _object(doc, f"{index}: the index")
    if "weight_map" not in top:
        raise WeightsmithError(f"{index}: not a valid safetensors index (no 'weight_map')")
    weight_map = _object(top["weight_map"], f"{index}: weight_map")
    if not weight_map:
        raise WeightsmithError(f"{index}: weight_map lists no tensors")
    for name, shard in weight_map.items():
        if type(shard) is not str:
            raise WeightsmithError(
                f"{index}: weight_map['{name}'] must be a shard file name, not {_json_type(shard)}"
            )
        if shard in ("", ".", "..") or "/" in shard or "\\" in shard or "\0" in shard or os.path.isabs(shard):
            raise WeightsmithError(
                f"{index}: weight_map['{name}'] = {_show(shard)} is not a plain file name inside "
                f"{index.parent}; shards must sit beside the index"
            )
    return weight_map


def _inside(root: Path, f: Path) -> Path:
    """``f`` if it resolves to inside the model directory ``root``, else an error; nothing is opened.

    A Hugging Face hub snapshot (``models--X/snapshots/REV``) links its files into the same repository's
    ``models--X/blobs``, which therefore counts as inside.
    """
    real, base = f.resolve(), root.resolve()
    allowed = [base]
    if base.parent.name == "snapshots":
        allowed.append(base.parent.parent / "blobs")
    if not any(real.is_relative_to(a) for a in allowed):
        raise WeightsmithError(
            f"{f}: resolves to {real}, outside the model directory {root}; refusing to read it"
        )
    return f


def _torch_state_dict(path: Path) -> WeightStore:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsmithError(f"{path}: cannot load as a weights-only torch state dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsmithError(f"{path}: expected a state dict, got {type(state).__name__}")
    return DictStore({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, str(path))


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` is a race)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | os.PathLike[str]) -> None:
    """Give a file the mode a plain ``open()`` would (0644 under the usual umask).

    ``safetensors.torch.save_file`` / ``save_model`` create files 0600 (they write through a private
    temporary file), unlike every other output; call this on what they wrote.
    """
    try:
        os.chmod(path, 0o666 & ~_umask())
    except OSError as exc:
        raise staging.user_error(exc, Path(path), "setting permissions of") from exc


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with normal permissions, for small files written whole inside a
    staging directory (a model streams through :class:`ShardWriter` instead)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except OSError as exc:
        raise staging.user_error(exc, Path(path)) from exc
    except SafetensorError as exc:  # the library's I/O errors (no errno): disk full, missing directory
        raise WeightsmithError(f"writing {path} failed: {exc}") from exc
    normal_permissions(path)


def _write_chunk(fh: Any, data: Any) -> None:
    """One write to a shard file (a separate function so tests can simulate a full disk)."""
    fh.write(data)


class ShardWriter:
    """Stream tensors into Hugging Face-compatible sharded safetensors, atomically, one tensor in memory.

    Each tensor's bytes go straight to the current shard file, behind a reserved header region; when
    the shard is full the JSON header is written into that region, padded with spaces (which the
    safetensors format allows), so peak memory is one tensor, not one shard. Everything is written
    into a :class:`weightsmith.staging.Staging` directory (``tmp``) that ``close()`` swaps in whole;
    an error or interruption removes it, so no half-written model that looks complete is ever left
    behind, and a full disk or read-only directory is a ``WeightsmithError`` naming the path. Use it
    as a context manager.
    """

    HEADER_BYTES = 1 << 20  # reserved per shard; a shard is closed early before its header outgrows it

    def __init__(
        self,
        out: str | os.PathLike[str],
        max_shard_bytes: int = 2 * 1024**3,
        dtype: torch.dtype | None = None,
        force: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.out = Path(out)
        self._staging = staging.Staging(out, force, directory=True)
        self.tmp = self._staging.path
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype
        self.metadata = {"format": "pt", **(metadata or {})}
        self._names: set[str] = set()
        self._shards: list[list[str]] = []
        self._file: Any = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._offset = 0  # data bytes written to the current shard
        self._header_estimate = 0
        self._total = 0
        self._closed = False

    def _shard_path(self, index: int) -> Path:
        return self.tmp / f"shard-{index:05d}.safetensors"

    def _failed(self, exc: OSError) -> WeightsmithError:
        """Abort (removing the staging) and describe the failure, naming the output."""
        self.abort()
        return staging.user_error(exc, self.out)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._closed:
            raise WeightsmithError(f"{self.out}: tensor '{name}' added after the writer was closed")
        if name in self._names:
            raise WeightsmithError(f"tensor '{name}' written twice to {self.out}")
        t = tensor.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
        if t.dtype not in SAFETENSORS_NAMES:
            raise WeightsmithError(
                f"{self.out}: tensor '{name}' has dtype {t.dtype}, which safetensors cannot store"
            )
        nbytes = t.numel() * t.element_size()
        entry = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape)}
        entry_bytes = len(
            json.dumps({name: {**entry, "data_offsets": [self._offset, self._offset + nbytes]}})
        )
        full = self._offset + nbytes > self.max_shard_bytes
        if (
            self._file is not None
            and self._entries
            and (full or self._header_estimate + entry_bytes > self.HEADER_BYTES // 2)
        ):
            self._finish_shard()
        try:
            if self._file is None:
                self._start_shard()
            if nbytes:
                _write_chunk(self._file, t.reshape(-1).view(torch.uint8).numpy())
        except OSError as exc:
            raise self._failed(exc) from exc
        self._entries[name] = {**entry, "data_offsets": [self._offset, self._offset + nbytes]}
        self._header_estimate += entry_bytes
        self._offset += nbytes
        self._total += nbytes
        self._names.add(name)

    def _start_shard(self) -> None:
        path = self._shard_path(len(self._shards))
        self._file = open(path, "wb")  # noqa: SIM115 (closed by _finish_shard or abort); 0666 & ~umask
        self._file.seek(8 + self.HEADER_BYTES)
        self._entries, self._offset, self._header_estimate = {}, 0, 0

    def _finish_shard(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.HEADER_BYTES:  # a single tensor name larger than the reserve
            self.abort()
            raise WeightsmithError(f"{self.out}: safetensors header of {len(header)} bytes is too large")
        try:
            self._file.seek(0)
            _write_chunk(self._file, struct.pack("<Q", self.HEADER_BYTES))
            _write_chunk(self._file, header + b" " * (self.HEADER_BYTES - len(header)))
            self._file.close()
        except OSError as exc:
            raise self._failed(exc) from exc
        self._file = None
        self._shards.append(list(self._entries))

    def copy_files(self, src_dir: str | os.PathLike[str], patterns: tuple[str, ...]) -> None:
        """Copy config/tokenizer files (by glob) from ``src_dir`` into the output."""
        try:
            for pattern in patterns:
                for f in Path(src_dir).glob(pattern):
                    if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
                        shutil.copyfile(f, self.tmp / f.name)
        except OSError as exc:
            raise self._failed(exc) from exc

    def write_text(self, name: str, text: str) -> None:
        """Write one text file (a config, a model card) into the output directory."""
        try:
            (self.tmp / name).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise self._failed(exc) from exc

    def close(self) -> Path:
        """Finish the last shard, write the index when there are several, and swap the output in."""
        if self._closed:
            return self.out
        try:
            if self._file is None and not self._shards:
                self._start_shard()
            if self._file is not None:
                self._finish_shard()
            n = len(self._shards)
            if n == 1:
                os.replace(self._shard_path(0), self.tmp / "model.safetensors")
            else:
                weight_map = {}
                for i, names in enumerate(self._shards):
                    final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                    os.replace(self._shard_path(i), self.tmp / final)
                    weight_map.update({name: final for name in names})
                index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
                (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        except OSError as exc:
            raise self._failed(exc) from exc
        self._staging.commit()
        self._closed = True
        return self.out

    def abort(self) -> None:
        """Drop everything written so far; the previous output (if any) is left untouched."""
        self._closed = True
        if self._file is not None:
            with contextlib.suppress(OSError):  # a full disk can fail the final flush too
                self._file.close()
            self._file = None
        self._staging.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
