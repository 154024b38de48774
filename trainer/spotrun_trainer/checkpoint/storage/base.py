"""The interface every checkpoint storage backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from ..codec import decode


class Store(ABC):
    """Content-addressed chunks, per-step manifests and one atomically replaced pointer.

    Layout (the same on a volume and under an S3 prefix): ``chunks/<hash[:2]>/<hash>``,
    ``manifests/<step:012d>.json``, ``LATEST``. Durability contract: ``put_manifest``
    and ``replace_pointer`` are durable on return; chunks are durable once
    ``sync_chunks`` returns. The checkpointer orders the calls (chunks, manifest,
    pointer); a backend never reorders them.
    """

    location: str  # "volume" or "s3": where a checkpoint read from here lives
    default_codec: str  # the codec "auto" picks for this sink
    prefers_listing = False  # True where one LIST per save beats a lookup per chunk

    @abstractmethod
    def chunk_size(self, digest: str) -> int | None:
        """Stored size of a chunk, or None when the store does not hold it."""

    @abstractmethod
    def put_chunk(self, digest: str, parts: Sequence[Any]) -> int:
        """Store a chunk (header + payload buffers) under its name; returns bytes written."""

    def sync_chunks(self) -> None:
        """Make every chunk put so far durable (a no-op where puts are durable already)."""
        return None

    def sync_deletions(self) -> None:
        """Make manifest deletions durable before chunks go (a no-op where they are)."""
        return None

    @abstractmethod
    def get_chunk(self, digest: str) -> bytes:
        """The stored bytes of a chunk; ChunkMissingError when absent."""

    def get_chunk_header(self, digest: str, size: int) -> bytes:
        """The first ``size`` bytes of a stored chunk."""
        return self.get_chunk(digest)[:size]

    def read_chunk_into(self, digest: str, out: Any) -> None:
        """Decode a chunk straight into ``out`` (a writable buffer of its raw length)."""
        decode(self.get_chunk(digest), out)

    @abstractmethod
    def list_chunks(self) -> dict[str, int]:
        """Every chunk held, with its stored size."""

    @abstractmethod
    def delete_chunks(self, digests: Sequence[str]) -> None: ...

    @abstractmethod
    def put_manifest(self, step: int, data: bytes) -> None: ...

    @abstractmethod
    def get_manifest(self, step: int) -> bytes: ...

    @abstractmethod
    def list_manifests(self) -> list[int]: ...

    @abstractmethod
    def delete_manifest(self, step: int) -> None: ...

    @abstractmethod
    def replace_pointer(self, data: bytes) -> None:
        """Atomically replace LATEST: a reader sees the old pointer or the new, never a mix."""

    @abstractmethod
    def get_pointer(self) -> bytes | None: ...

    def clean_temporary(self) -> None:
        """Remove leftovers of interrupted writes (nothing to do where writes are atomic)."""
        return None

    def describe(self) -> str:
        return self.location
