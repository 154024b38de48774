"""The manifest schema: one JSON document per checkpoint, and the LATEST pointer."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import blake3

from .errors import CorruptCheckpointError

FORMAT = "spotrun-checkpoint"
MANIFEST_VERSION = 1


def manifest_key(step: int) -> str:
    return f"manifests/{step:012d}.json"


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


@dataclass(frozen=True)
class ChunkRef:
    """A run of a tensor's bytes stored in one chunk object.

    ``offset``/``length`` locate the run inside the chunk's decoded bytes (a chunk of a
    large tensor is one piece; a pack of small tensors holds many); ``stored_length`` is
    the object's size in the store and ``codec`` the codec it was written with.
    """

    hash: str
    offset: int
    length: int
    stored_length: int
    codec: str

    def to_json(self) -> list[Any]:
        return [self.hash, self.offset, self.length, self.stored_length, self.codec]

    @classmethod
    def from_json(cls, item: list[Any]) -> ChunkRef:
        digest, offset, length, stored_length, codec = item
        return cls(str(digest), int(offset), int(length), int(stored_length), str(codec))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: its dtype and shape, the chunks holding its bytes in order, and its
    checksum (blake3 over the chunk list, see ``chunking.tensor_checksum``).
    ``alias_of`` names another entry sharing the same storage (tied weights), which
    then has no chunks of its own."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[ChunkRef, ...] = ()
    checksum: str = ""
    alias_of: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(c.length for c in self.chunks)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dtype": self.dtype, "shape": list(self.shape)}
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        else:
            out["chunks"] = [c.to_json() for c in self.chunks]
            out["checksum"] = self.checksum
        return out

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> TensorEntry:
        return cls(
            dtype=str(item["dtype"]),
            shape=tuple(int(d) for d in item["shape"]),
            chunks=tuple(ChunkRef.from_json(c) for c in item.get("chunks", ())),
            checksum=str(item.get("checksum", "")),
            alias_of=item.get("alias_of"),
        )


@dataclass
class Manifest:
    """Everything needed to rebuild one checkpoint; ``tree`` holds the non-tensor state."""

    step: int
    tensors: dict[str, TensorEntry]
    tree: dict[str, Any]
    codec: str
    hash: str = "xxh3-128"  # the content hash naming (and verifying) the chunks
    created: float = field(default_factory=time.time)

    def chunk_hashes(self) -> set[str]:
        return {c.hash for e in self.tensors.values() for c in e.chunks}

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": MANIFEST_VERSION,
            "step": self.step,
            "created": self.created,
            "codec": self.codec,
            "hash": self.hash,
            "tensors": {name: e.to_json() for name, e in self.tensors.items()},
            "tree": self.tree,
        }
        # The checksum covers the canonical encoding of every other field, so a flipped
        # byte anywhere in the file is caught before any chunk is read.
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
            checksum = body.pop("checksum")
        except (ValueError, KeyError, AttributeError, TypeError) as error:
            raise CorruptCheckpointError(f"manifest is not valid JSON: {error}") from error
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        if blake3.blake3(canonical.encode()).hexdigest() != checksum:
            raise CorruptCheckpointError("manifest checksum mismatch")
        if body.get("format") != FORMAT or body.get("version") != MANIFEST_VERSION:
            raise CorruptCheckpointError(
                f"unsupported manifest {body.get('format')!r} version {body.get('version')!r}"
            )
        return cls(
            step=int(body["step"]),
            tensors={n: TensorEntry.from_json(e) for n, e in body["tensors"].items()},
            tree=body["tree"],
            codec=str(body["codec"]),
            # manifests from before the hash was recorded name their chunks by blake3
            hash=str(body.get("hash", "blake3")),
            created=float(body["created"]),
        )


def pointer_bytes(step: int) -> bytes:
    return json.dumps({"manifest": manifest_key(step), "step": step}).encode()


def parse_pointer(data: bytes) -> int:
    """The step a LATEST pointer names; CorruptCheckpointError when it is unreadable."""
    try:
        body = json.loads(data)
        step = int(body["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise CorruptCheckpointError(f"LATEST pointer unreadable: {error}") from error
    if body.get("manifest") != manifest_key(step):
        raise CorruptCheckpointError("LATEST pointer names a manifest that does not match its step")
    return step
