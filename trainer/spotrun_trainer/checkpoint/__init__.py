"""The trainer's checkpoint store: content-addressed chunks, manifests and a LATEST pointer,
on the checkpoint volume and mirrored to S3."""

from .checkpointer import Checkpointer, CommitInfo, Restored, SaveHandle
from .errors import (
    CheckpointError,
    ChunkMissingError,
    CorruptCheckpointError,
    UnsupportedStateError,
)
from .storage import LocalStore, S3Store, Store

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "ChunkMissingError",
    "CommitInfo",
    "CorruptCheckpointError",
    "LocalStore",
    "Restored",
    "S3Store",
    "SaveHandle",
    "Store",
    "UnsupportedStateError",
]
