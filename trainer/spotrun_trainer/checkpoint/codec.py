"""Chunk encodings: the 16-byte chunk header, raw bytes, zstd, and byte-plane filters."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from .errors import CorruptCheckpointError

# Every stored chunk starts with this header, so a chunk is self-describing: a store
# that already holds a chunk (same content hash) written with another codec is still
# read correctly, whatever codec the current run prefers.
_HEADER = struct.Struct("<4sBBBxQ")  # magic, codec id, itemsize, flags, pad, raw length
HEADER_SIZE = _HEADER.size
_MAGIC = b"SRK1"
_FLAG_ROTATED = 1  # float elements rotated left by one bit before splitting planes

CODECS = ("raw", "zstd", "shuffle-zstd", "planes")
_CODEC_IDS = {name: i for i, name in enumerate(CODECS)}

# Planes that zstd cannot shrink below this fraction of their size are stored raw: the
# low mantissa bytes of trained weights are close to random, and skipping them halves
# the compression work for fp32 at no cost in size.
_KEEP_RAW_ABOVE = 0.97
_SAMPLE_BYTES = 64 << 10
_PLANE_TABLE = struct.Struct("<BQ")  # method (0 raw, 1 zstd), stored length
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe; one per thread and level.
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class Header:
    codec: str
    itemsize: int
    flags: int
    raw_length: int


def parse_header(data: Any) -> Header:
    if len(data) < HEADER_SIZE:
        raise CorruptCheckpointError("chunk shorter than its header")
    magic, codec_id, itemsize, flags, raw_length = _HEADER.unpack_from(data, 0)
    if magic != _MAGIC or codec_id >= len(CODECS):
        raise CorruptCheckpointError("chunk header unreadable")
    return Header(CODECS[codec_id], itemsize, flags, raw_length)


def _as_u8(data: Any) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def _planes(data: Any, itemsize: int, rotate: bool) -> np.ndarray:
    """Byte planes of ``data``: row i holds byte i of every element."""
    arr = _as_u8(data)
    if rotate:
        # Rotating the sign bit to the bottom leaves the exponent alone in the top byte
        # (fp32, bf16), which is where nearly all the compressible entropy lives.
        words = arr.view(_UINT[itemsize])
        bits = itemsize * 8
        arr = ((words << 1) | (words >> (bits - 1))).view(np.uint8)
    return np.ascontiguousarray(arr.reshape(-1, itemsize).T)


def _unplanes(planes: np.ndarray, out: np.ndarray, itemsize: int, rotate: bool) -> None:
    out.reshape(-1, itemsize)[:] = planes.T
    if rotate:
        words = out.view(_UINT[itemsize])
        bits = itemsize * 8
        words[:] = (words >> 1) | (words << (bits - 1))


def _worth_compressing(plane: np.ndarray) -> bool:
    n = plane.size
    if n <= 4 * _SAMPLE_BYTES:
        sample = plane
    else:
        step = n // 4
        sample = np.concatenate([plane[i * step : i * step + _SAMPLE_BYTES] for i in range(4)])
    return len(_compressor(1).compress(sample)) < _KEEP_RAW_ABOVE * sample.size


def raw_header(length: int) -> bytes:
    """The header of a raw chunk of ``length`` bytes (its payload is written as is)."""
    return _HEADER.pack(_MAGIC, _CODEC_IDS["raw"], 1, 0, length)


def encode(
    codec: str, data: Any, *, itemsize: int = 1, is_float: bool = False, level: int = 1
) -> list[Any]:
    """Encode one chunk's bytes; returns the buffers to write, header first."""
    raw_length = len(data) if not isinstance(data, np.ndarray) else data.nbytes
    if codec not in _CODEC_IDS:
        raise ValueError(f"unknown codec {codec!r}; choose one of {CODECS}")
    shuffled = codec in ("shuffle-zstd", "planes") and itemsize > 1 and raw_length % itemsize == 0
    rotate = codec == "planes" and shuffled and is_float and itemsize in _UINT
    flags = _FLAG_ROTATED if rotate else 0
    width = itemsize if shuffled else 1
    header = _HEADER.pack(_MAGIC, _CODEC_IDS[codec], width, flags, raw_length)
    if codec == "raw":
        return [header, data]
    if codec == "zstd" or (codec == "shuffle-zstd" and not shuffled):
        return [header, _compressor(level).compress(data)]
    if codec == "shuffle-zstd":
        return [header, _compressor(level).compress(_planes(data, itemsize, False))]
    # planes: each byte plane stored on its own, compressed only when that pays
    planes = _planes(data, width, rotate) if width > 1 else _as_u8(data).reshape(1, -1)
    table, blobs = [], []
    for plane in planes:
        if plane.size and _worth_compressing(plane):
            blob = _compressor(level).compress(plane)
            method = 1
        else:
            blob, method = plane, 0
        table.append(_PLANE_TABLE.pack(method, len(blob) if method else plane.size))
        blobs.append(blob)
    return [header, bytes([len(planes)]), *table, *blobs]


def decode(stored: Any, out: Any | None = None) -> Any:
    """Decode a whole stored chunk (header included) into ``out`` or a new buffer."""
    header = parse_header(stored)
    view = memoryview(stored)[HEADER_SIZE:]
    n = header.raw_length
    target = np.empty(n, dtype=np.uint8) if out is None else _as_u8(out)
    if target.size != n:
        raise CorruptCheckpointError(f"chunk holds {n} bytes, {target.size} expected")
    try:
        if header.codec == "raw":
            if len(view) != n:
                raise CorruptCheckpointError("raw chunk has the wrong length")
            target[:] = _as_u8(view)
        elif header.codec == "zstd" or (header.codec == "shuffle-zstd" and header.itemsize <= 1):
            target[:] = _as_u8(_decompressor().decompress(view, max_output_size=n))
        elif header.codec == "shuffle-zstd":
            planes = _as_u8(_decompressor().decompress(view, max_output_size=n))
            _unplanes(planes.reshape(header.itemsize, -1), target, header.itemsize, False)
        else:
            _decode_planes(view, target, header)
    except (zstandard.ZstdError, ValueError) as error:
        raise CorruptCheckpointError(f"chunk does not decode: {error}") from error
    return target


def _decode_planes(view: memoryview, target: np.ndarray, header: Header) -> None:
    count = view[0]
    width = header.itemsize
    if count != max(width, 1):
        raise CorruptCheckpointError("plane table does not match the element size")
    pos = 1 + count * _PLANE_TABLE.size
    per_plane = header.raw_length // count
    planes = np.empty((count, per_plane), dtype=np.uint8)
    for i in range(count):
        method, length = _PLANE_TABLE.unpack_from(view, 1 + i * _PLANE_TABLE.size)
        blob = view[pos : pos + length]
        pos += length
        if method == 1:
            planes[i] = _as_u8(_decompressor().decompress(blob, max_output_size=per_plane))
        else:
            planes[i] = _as_u8(blob)
    if pos != len(view):
        raise CorruptCheckpointError("plane payload has the wrong length")
    if count == 1:
        target[:] = planes[0]
    else:
        _unplanes(planes, target, width, bool(header.flags & _FLAG_ROTATED))
