"""WeightStore: a lazy ``name -> Tensor`` mapping; ShardWriter: atomic sharded safetensors output.

A store knows every tensor's shape and dtype without reading it, and reads tensors one at a time
from memory-mapped safetensors (keeping at most one shard open), so a checkpoint larger than RAM
streams through ``execute.map_weights`` with bounded memory.
"""

from __future__ import annotations

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

from .errors import WeightsmithError, close_names

INDEX_NAME = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


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

    def __init__(self, files: list[Path], source: str) -> None:
        self.source = source
        self.files = files
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, first byte, end byte)
        self._meta: dict[str, TensorMeta] = {}
        self.metadata = {}
        for f in files:
            header, data_start = read_header(f)
            self.metadata.update(header.pop("__metadata__", {}) or {})
            for name, info in header.items():
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise WeightsmithError(f"{f}: tensor '{name}' has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                meta = TensorMeta(tuple(info["shape"]), dtype)
                if end - begin != meta.nbytes:
                    raise WeightsmithError(
                        f"{f}: tensor '{name}' claims shape {list(meta.shape)} {info['dtype']} "
                        f"({meta.nbytes} bytes) but spans {end - begin} bytes; the file is corrupt"
                    )
                self._where[name] = (f, data_start + begin, data_start + end)
                self._meta[name] = meta
        self._open_path: Path | None = None
        self._handle: Any = None

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
            if end > begin:
                got = os.preadv(self._handle.fileno(), [buf.numpy()], begin)  # type: ignore[list-item]
                if got != end - begin:
                    raise OSError(f"short read ({got} of {end - begin} bytes)")
        except OSError as exc:
            raise WeightsmithError(f"{path}: cannot read tensor '{name}': {exc}") from exc
        return buf.view(meta.dtype).reshape(meta.shape)

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


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header without reading tensor data: ``(header, data_start)``."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise WeightsmithError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise WeightsmithError(f"{path}: corrupt safetensors header (claims {n} bytes)")
            header = json.loads(fh.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightsmithError(f"{path}: corrupt safetensors header: {exc}") from exc
    except OSError as exc:
        raise WeightsmithError(f"{path}: cannot read: {exc.strerror}") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise WeightsmithError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end}); "
            "re-download or re-save it"
        )
    return header, 8 + n


def open_store(path: str | os.PathLike[str]) -> WeightStore:
    """Open weights at ``path``: a safetensors file, a directory (sharded or not), or a torch state dict."""
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsmithError(f"no such file or directory: {p}")
    if p.is_dir():
        index = p / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise WeightsmithError(f"{index}: not a valid safetensors index ({exc})") from exc
            files = sorted({p / f for f in weight_map.values()})
            for f in files:
                if not f.is_file():
                    raise WeightsmithError(f"{index}: lists shard {f.name}, which is missing")
            return SafetensorsStore(files, str(p))
        if (p / "model.safetensors").is_file():  # a HF directory may hold other safetensors (heads, adapters)
            return SafetensorsStore([p / "model.safetensors"], str(p))
        files = sorted(p.glob("*.safetensors"))
        if files:
            return SafetensorsStore(files, str(p))
        for name in ("pytorch_model.bin", "model.pt", "model.pth"):
            if (p / name).is_file():
                return _torch_state_dict(p / name)
        raise WeightsmithError(f"{p}: no *.safetensors, {INDEX_NAME} or pytorch_model.bin inside")
    if p.suffix == ".safetensors":
        return SafetensorsStore([p], str(p))
    if p.suffix in (".bin", ".pt", ".pth"):
        return _torch_state_dict(p)
    raise WeightsmithError(
        f"{p}: unknown weight format (expected .safetensors, a model directory or .bin/.pt)"
    )


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


def prepare_output(out: str | os.PathLike[str], force: bool) -> Path:
    """Refuse to overwrite an existing output unless ``force``; the old one is replaced only at the end."""
    out = Path(out)
    if out.exists() and not force:
        raise WeightsmithError(f"output {out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def atomic_replace(tmp: Path, final: Path) -> None:
    """Move a finished ``tmp`` (file or directory) to ``final``, replacing an existing one last."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.replace(tmp, final)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file via a temporary name and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def _write_chunk(fh: Any, data: Any) -> None:
    """One write to a shard file (a separate function so tests can simulate a full disk)."""
    fh.write(data)


class ShardWriter:
    """Stream tensors into Hugging Face-compatible sharded safetensors, atomically, one tensor in memory.

    Each tensor's bytes go straight to the current shard file, behind a reserved header region; when
    the shard is full the JSON header is written into that region, padded with spaces (which the
    safetensors format allows), so peak memory is one tensor, not one shard. Everything is written to
    a hidden ``.NAME.partial-PID`` directory beside ``out`` and renamed to ``out`` by ``close()``; an
    error or interruption removes the partial directory, so no half-written model that looks complete
    is ever left behind. Use it as a context manager.
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
        self.out = prepare_output(out, force)
        self.tmp = self.out.with_name(f".{self.out.name}.partial-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
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

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise WeightsmithError(f"tensor '{name}' written twice to {self.out}")
        t = tensor.detach().to("cpu")
        if self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        t = t.contiguous()
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
        if self._file is None:
            self._start_shard()
        try:
            if nbytes:
                _write_chunk(self._file, t.reshape(-1).view(torch.uint8).numpy())
        except OSError as exc:
            self.abort()
            raise WeightsmithError(
                f"writing {self.out} failed ({exc.strerror}); nothing was left behind"
            ) from exc
        self._entries[name] = {**entry, "data_offsets": [self._offset, self._offset + nbytes]}
        self._header_estimate += entry_bytes
        self._offset += nbytes
        self._total += nbytes
        self._names.add(name)

    def _start_shard(self) -> None:
        path = self._shard_path(len(self._shards))
        self._file = open(path, "wb")  # noqa: SIM115 (closed by _finish_shard or abort)
        self._file.seek(8 + self.HEADER_BYTES)
        self._entries, self._offset, self._header_estimate = {}, 0, 0

    def _finish_shard(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self.HEADER_BYTES:  # a single tensor name larger than the reserve
            raise WeightsmithError(f"{self.out}: safetensors header of {len(header)} bytes is too large")
        try:
            self._file.seek(0)
            _write_chunk(self._file, struct.pack("<Q", self.HEADER_BYTES))
            _write_chunk(self._file, header + b" " * (self.HEADER_BYTES - len(header)))
            self._file.close()
        except OSError as exc:
            self.abort()
            raise WeightsmithError(
                f"writing {self.out} failed ({exc.strerror}); nothing was left behind"
            ) from exc
        self._file = None
        self._shards.append(list(self._entries))

    def copy_files(self, src_dir: str | os.PathLike[str], patterns: tuple[str, ...]) -> None:
        """Copy config/tokenizer files (by glob) from ``src_dir`` into the output."""
        for pattern in patterns:
            for f in Path(src_dir).glob(pattern):
                if f.is_file() and not f.name.endswith(".safetensors") and f.name != INDEX_NAME:
                    shutil.copy2(f, self.tmp / f.name)

    def write_text(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def close(self) -> Path:
        if self._closed:
            return self.out
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
        atomic_replace(self.tmp, self.out)
        self._closed = True
        return self.out

    def abort(self) -> None:
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
