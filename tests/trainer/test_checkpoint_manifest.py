"""Manifest and LATEST pointer encoding, and their damage detection."""

from __future__ import annotations

import json

import pytest

from spotrun_trainer.checkpoint import CorruptCheckpointError
from spotrun_trainer.checkpoint.manifest import (
    ChunkRef,
    Manifest,
    TensorEntry,
    chunk_key,
    manifest_key,
    parse_pointer,
    pointer_bytes,
)


def _manifest() -> Manifest:
    ref = ChunkRef("ab" * 32, 0, 16, 32, "raw")
    return Manifest(
        step=120,
        tensors={
            "model/w": TensorEntry("float32", (2, 2), (ref,), "cd" * 32),
            "model/tied": TensorEntry("float32", (2, 2), alias_of="model/w"),
        },
        tree={"dict": [[{"str": "model"}, {"tensor": "model/w"}]]},
        codec="raw",
    )


def test_manifest_round_trip():
    manifest = _manifest()
    again = Manifest.from_bytes(manifest.to_bytes())
    assert again == manifest
    assert again.chunk_hashes() == {"ab" * 32}
    body = json.loads(manifest.to_bytes())
    assert body["version"] == 1 and body["step"] == 120 and body["checksum"]


def test_manifest_any_flipped_byte_is_detected():
    data = _manifest().to_bytes()
    for offset in range(0, len(data), 7):
        damaged = bytearray(data)
        damaged[offset] ^= 0x01
        with pytest.raises(CorruptCheckpointError):
            Manifest.from_bytes(bytes(damaged))


def test_manifest_unknown_version_is_refused():
    body = json.loads(_manifest().to_bytes())
    body["version"] = 99
    body.pop("checksum")
    with pytest.raises(CorruptCheckpointError):
        Manifest.from_bytes(json.dumps(body).encode())


def test_manifest_pointer_follows_the_contract():
    assert json.loads(pointer_bytes(120)) == {
        "manifest": "manifests/000000000120.json",
        "step": 120,
    }
    assert parse_pointer(pointer_bytes(120)) == 120
    assert manifest_key(7) == "manifests/000000000007.json"
    assert chunk_key("abcdef") == "chunks/ab/abcdef"
    with pytest.raises(CorruptCheckpointError):
        parse_pointer(b'{"manifest": "manifests/000000000001.json", "step": 2}')
    with pytest.raises(CorruptCheckpointError):
        parse_pointer(b'{"step"')
