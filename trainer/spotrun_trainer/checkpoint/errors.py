"""Exceptions raised by the checkpoint store."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every checkpoint-store error."""


class CorruptCheckpointError(CheckpointError):
    """A manifest, pointer or chunk failed verification (bad checksum, torn, missing)."""


class ChunkMissingError(CorruptCheckpointError):
    """A manifest refers to a chunk that the store does not hold."""


class UnsupportedStateError(CheckpointError, TypeError):
    """The state holds a value the checkpoint cannot represent exactly."""
