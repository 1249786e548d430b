"""Read and write single safetensors files, one tensor at a time.

Written here rather than through `safetensors.numpy` so that bfloat16 and float8 tensors load
into numpy (via ml_dtypes), reads are zero-copy views of a memory map (a checkpoint is never
read whole), and a truncated or inconsistent file is reported as such before any tensor is used.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import math
import queue
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from bdjax.errors import CheckpointError

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20
# Tensors move to and from files in pieces of this size: the page cache took 4 MB pieces faster
# than one call per tensor here (see benchmarks/defend_stream.py).
_IO_CHUNK = 4 * 2**20


class TensorFile:
    """A parsed safetensors file; `tensor(name)` returns a read-only view into the memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                n = int.from_bytes(raw_len, "little") if len(raw_len) == 8 else -1
                if n < 0 or n > _MAX_HEADER or 8 + n > size:
                    raise CheckpointError(f"{self.path} is truncated or not a safetensors file "
                                          f"(header length {n}, file size {size})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{self.path} has a corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} has a corrupt safetensors header")
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        data_len = size - self._start
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: tensor {name!r} has an unsupported or corrupt header "
                                      f"entry {info!r}") from None
            if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - begin} bytes for shape {shape}")
            if end > data_len:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends at byte {end} of the data "
                                      f"section, which holds only {data_len} bytes")
            self.entries[name] = (dtype, shape, begin, end)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start else None

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> np.ndarray:
        """A private copy of one tensor, read with plain file I/O. Unlike `tensor`, nothing stays
        mapped afterwards, so streaming a large checkpoint keeps the resident set small. The copy
        is 64-byte aligned, so JAX on CPU uses it in place instead of copying it again."""
        dtype, shape, begin, end = self.entries[name]
        out = aligned_empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self._start + begin)
            for start in range(0, len(view), _IO_CHUNK):
                piece = view[start:start + _IO_CHUNK]
                if f.readinto(piece) != len(piece):
                    raise CheckpointError(f"{self.path} is truncated inside tensor {name!r}")
        return out

    def tensor(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[name]
        if begin == end:
            return np.zeros(shape, dtype)
        return self._map[self._start + begin:self._start + end].view(dtype).reshape(shape)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, align: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `align`-byte boundary. XLA's CPU client
    aliases such host buffers (`jax.device_put`, jit arguments) instead of copying them
    (`benchmarks/defend_stream.py` measures what that buys)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    start = -raw.ctypes.data % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def write_file(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None,
               ) -> None:
    """Write (name, array) pairs to one safetensors file, copying one tensor at a time."""
    items = list(tensors)
    write_stream(path, [(name, arr.dtype, arr.shape) for name, arr in items], (arr for _, arr in items), metadata)


def write_stream(path: str | Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (name, dtype, shape) are known up front and whose
    arrays arrive one at a time, in the same order. A writer thread puts each array's bytes on
    disk while the next one is produced (file writes release the GIL), so at most three are held:
    one being written, one queued, one being made."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise CheckpointError(f"cannot save tensor {name!r} of dtype {dtype} to safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        with _BackgroundWriter(f) as writer:
            it = iter(arrays)
            for name, dtype, shape in entries:
                arr = next(it)
                if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                    raise CheckpointError(f"tensor {name!r} came out as {arr.dtype}{tuple(arr.shape)}, "
                                          f"not the announced {np.dtype(dtype)}{tuple(shape)}")
                writer.put(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # bytes of any dtype (bf16 too)


class _BackgroundWriter:
    """Writes queued byte arrays to a file, in order, on its own thread; an error there is
    raised in the caller at the next `put` or at exit."""

    def __init__(self, f):
        self.f, self.error = f, None
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    view = memoryview(data)
                    for start in range(0, len(view), _IO_CHUNK):
                        self.f.write(view[start:start + _IO_CHUNK])
                except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
                    self.error = e

    def put(self, data: np.ndarray) -> None:
        self._check()
        self.queue.put(data)

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.queue.put(None)
        self.thread.join()
        if exc[0] is None:
            self._check()


def iter_files(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        tf = TensorFile(file)
        for name in tf.keys():
            yield name, tf.tensor(name)
