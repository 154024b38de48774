"""Splitting staged tensors into content-addressed chunk objects, and hashing them."""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3
import numpy as np
import torch

from .staging import byte_view

DEFAULT_CHUNK_BYTES = 64 << 20
# Tensors below this size share pack objects: one file (or PUT) and one fsync per pack
# instead of per bias/LayerNorm/step tensor. Packs are cut at tensor boundaries and
# follow state order, so a model's small tensors and an optimizer's rarely share one.
DEFAULT_SMALL_BYTES = 1 << 20
DEFAULT_PACK_BYTES = 8 << 20

_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


def hash_bytes(*parts: np.ndarray) -> str:
    h = blake3.blake3()
    for p in parts:
        h.update(p)
    return h.hexdigest()


@dataclass
class Piece:
    """``length`` bytes of tensor ``name`` from ``tensor_offset``, at ``object_offset``
    in chunk object ``index``."""

    name: str
    tensor_offset: int
    object_offset: int
    length: int
    index: int


@dataclass
class ChunkObject:
    parts: list[np.ndarray]
    itemsize: int
    is_float: bool
    length: int = 0
    digest: str = ""
    pieces: list[Piece] = field(default_factory=list)

    def ensure_digest(self) -> str:
        if not self.digest:
            self.digest = hash_bytes(*self.parts)
        return self.digest


@dataclass
class Plan:
    objects: list[ChunkObject]
    pieces: dict[str, list[Piece]]  # tensor name -> its pieces in byte order
    nbytes: int

    def tensor_checksum(self, name: str) -> str:
        """The tensor's checksum: see :func:`tensor_checksum`."""
        return tensor_checksum(
            [
                (self.objects[p.index].ensure_digest(), p.object_offset, p.length)
                for p in self.pieces[name]
            ]
        )


def tensor_checksum(pieces: list[tuple[str, int, int]]) -> str:
    """blake3 over the tensor's (chunk hash, offset, length) list: a Merkle root of its
    bytes. The chunk hashes already bind every byte, so this binds the tensor to its
    content without a second pass over the data, on save and on restore."""
    text = "|".join(f"{digest}:{offset}:{length}" for digest, offset, length in pieces)
    return blake3.blake3(text.encode()).hexdigest()


def plan_chunks(
    tensors: dict[str, torch.Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    small_bytes: int = DEFAULT_SMALL_BYTES,
    pack_bytes: int = DEFAULT_PACK_BYTES,
) -> Plan:
    objects: list[ChunkObject] = []
    pieces: dict[str, list[Piece]] = {}
    pack: ChunkObject | None = None
    pack_index = -1
    total = 0
    for name, t in tensors.items():
        view = byte_view(t)
        n = view.size
        total += n
        pieces[name] = []
        if n == 0:
            continue
        if n < small_bytes:
            if pack is None or pack.length + n > pack_bytes:
                pack = ChunkObject(parts=[], itemsize=1, is_float=False)
                pack_index = len(objects)
                objects.append(pack)
            piece = Piece(name, 0, pack.length, n, pack_index)
            pack.parts.append(view)
            pack.length += n
            pack.pieces.append(piece)
            pieces[name].append(piece)
            continue
        itemsize = t.element_size()
        # equal-sized chunks aligned to whole elements, so byte planes stay aligned
        count = -(-n // chunk_bytes)
        size = -(-n // count // itemsize) * itemsize
        for start in range(0, n, size):
            stop = min(start + size, n)
            obj = ChunkObject(
                parts=[view[start:stop]],
                itemsize=itemsize,
                is_float=t.dtype in _FLOATS,
                length=stop - start,
            )
            piece = Piece(name, start, 0, stop - start, len(objects))
            obj.pieces.append(piece)
            objects.append(obj)
            pieces[name].append(piece)
    return Plan(objects=objects, pieces=pieces, nbytes=total)
