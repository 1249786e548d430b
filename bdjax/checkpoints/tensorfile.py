"""Read and write single safetensors files, one tensor at a time.

Written here rather than through `safetensors.numpy` so that bfloat16 and float8 tensors load
into numpy (via ml_dtypes), reads are zero-copy views of a memory map (a checkpoint is never
read whole), and a truncated or inconsistent file is reported as such before any tensor is used.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import mmap
import os
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
        """One tensor, for a pass that uses each tensor once: nothing of it stays resident once the
        array is dropped, so streaming a large checkpoint keeps the resident set small. A tensor
        whose bytes start 64-byte aligned in the file (every file bdjax writes) comes as a read-only
        view of its own memory map, which JAX on CPU uses in place: the page cache's pages, never
        copied. Any other comes as a private copy read with plain file I/O into a 64-byte-aligned
        buffer, which JAX also uses in place instead of copying it again."""
        dtype, shape, begin, end = self.entries[name]
        offset = self._start + begin
        if begin == end:
            return np.zeros(shape, dtype)
        if offset % 64 == 0:
            base = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                with open(self.path, "rb") as f:
                    m = mmap.mmap(f.fileno(), offset + (end - begin) - base, access=mmap.ACCESS_READ, offset=base)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"cannot map tensor {name!r} of {self.path}: {e}") from None
            return np.frombuffer(m, dtype, math.prod(shape), offset - base).reshape(shape)
        out = aligned_empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        with open(self.path, "rb", buffering=0) as f:
            f.seek(offset)
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
                 arrays: Iterable[np.ndarray], metadata: dict[str, str] | None = None, *,
                 direct: bool = False, align: int = 64) -> None:
    """Write a safetensors file whose tensors (name, dtype, shape) are known up front and whose
    arrays arrive one at a time, in the same order. A writer thread puts each array's bytes on
    disk while the next one is produced (file writes release the GIL), so at most three are held:
    one being written, one queued, one being made.

    `direct=True` writes around the page cache (O_DIRECT, through an aligned staging buffer) where
    the file system allows it, and falls back to ordinary writes where it does not: the file is on
    disk when this returns, and writing it needs no fresh page-cache memory, which on a VM whose
    host reclaims freed guest memory costs more than the disk (`benchmarks/defend_stream.py`).
    The data section starts `align`-byte aligned (64: `TensorFile.read` maps such tensors in place;
    the `safetensors` library itself aligns to 8)."""
    if align <= 0 or align % 8:
        raise ValueError(f"align={align} must be a positive multiple of 8")
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
    blob += b" " * (-(8 + len(blob)) % align)
    with _BackgroundWriter(path, direct) as writer:
        writer.put(np.frombuffer(len(blob).to_bytes(8, "little") + blob, np.uint8))
        it = iter(arrays)
        for name, dtype, shape in entries:
            arr = next(it)
            if arr.dtype != np.dtype(dtype) or tuple(arr.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} came out as {arr.dtype}{tuple(arr.shape)}, "
                                      f"not the announced {np.dtype(dtype)}{tuple(shape)}")
            writer.put(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))  # bytes of any dtype (bf16 too)


_BLOCK = 4096  # O_DIRECT transfers: buffer address, file offset and length in multiples of this
_STAGE = 8 * 2**20


class _BackgroundWriter:
    """Writes queued byte arrays to a new file, in order, on its own thread; an error there is
    raised in the caller at the next `put` or at exit. With `direct`, bytes gather in an aligned
    staging buffer written whole with O_DIRECT; the last partial block is padded, then cut off."""

    def __init__(self, path: str | Path, direct: bool):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(path, flags | os.O_DIRECT, 0o666)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT
                    raise
        self.direct = self.fd >= 0
        if not self.direct:
            self.fd = os.open(path, flags, 0o666)
        self.stage = aligned_empty((_STAGE,), np.uint8, _BLOCK) if self.direct else None
        self.fill = self.size = 0
        self.error: BaseException | None = None
        self.queue: queue.Queue = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _write(self, view: memoryview) -> None:
        while len(view):
            try:
                n = os.write(self.fd, view)
            except OSError as e:
                if not (self.direct and e.errno == errno.EINVAL and self.size == 0):
                    raise
                # accepted at open, refused at the first write (e.g. some FUSE mounts): write normally
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            self.size += n
            view = view[n:]

    def _flush_stage(self, final: bool) -> None:
        n = self.fill
        if final and n % _BLOCK:
            padded = n + (-n % _BLOCK)
            self.stage[n:padded] = 0
            self._write(memoryview(self.stage)[:padded])
            self.size -= padded - n
            os.ftruncate(self.fd, self.size)
        elif n:
            self._write(memoryview(self.stage)[:n])
        self.fill = 0

    def _take(self, data: np.ndarray) -> None:
        if self.stage is None:
            view = memoryview(data)
            for start in range(0, len(view), _IO_CHUNK):
                self._write(view[start:start + _IO_CHUNK])
            return
        start = 0
        while start < data.size:
            n = min(_STAGE - self.fill, data.size - start)
            self.stage[self.fill:self.fill + n] = data[start:start + n]
            self.fill += n
            start += n
            if self.fill == _STAGE:
                self._flush_stage(False)

    def _run(self) -> None:
        while (data := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._take(data)
                except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
                    self.error = e
        if self.error is None and self.stage is not None:
            try:
                self._flush_stage(True)
            except BaseException as e:  # noqa: BLE001
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
        os.close(self.fd)
        if exc[0] is None:
            self._check()


def iter_files(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        tf = TensorFile(file)
        for name in tf.keys():
            yield name, tf.tensor(name)
