"""Chunk codecs: exact round trips, self-describing headers, damage detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spotrun_trainer.checkpoint import CorruptCheckpointError
from spotrun_trainer.checkpoint.codec import CODECS, decode, encode, parse_header, raw_header
from spotrun_trainer.checkpoint.staging import byte_view

FLOATS = {torch.float32, torch.bfloat16, torch.float16, torch.float64}


def _join(parts) -> bytes:
    return b"".join(bytes(memoryview(p).cast("B")) for p in parts)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8]
)
def test_codec_round_trip_is_exact(codec, dtype):
    tensor = (torch.randn(10_001) * 3).to(dtype)
    data = byte_view(tensor)
    stored = _join(encode(codec, data, itemsize=tensor.element_size(), is_float=dtype in FLOATS))
    header = parse_header(stored)
    assert header.codec == codec and header.raw_length == data.size
    out = np.empty(data.size, np.uint8)
    decode(stored, out)
    assert out.tobytes() == data.tobytes()


def test_codec_planes_shrinks_fp32_and_keeps_random_bytes_raw():
    weights = byte_view(torch.randn(1 << 18) * 0.02)
    planes = len(_join(encode("planes", weights, itemsize=4, is_float=True)))
    shuffled = len(_join(encode("shuffle-zstd", weights, itemsize=4)))
    assert planes < 0.85 * weights.size and planes <= shuffled * 1.01
    noise = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    stored = _join(encode("planes", noise, itemsize=4, is_float=False))
    assert len(stored) <= noise.size + 64  # incompressible planes cost only the table


def test_codec_odd_length_falls_back_to_bytes():
    data = np.arange(1001, dtype=np.uint8)
    stored = _join(encode("planes", data, itemsize=4, is_float=True))
    assert decode(stored).tobytes() == data.tobytes()


def test_codec_raw_header_matches_encode():
    data = np.arange(10, dtype=np.uint8)
    assert raw_header(10) == encode("raw", data)[0]


@pytest.mark.parametrize("codec", ["zstd", "shuffle-zstd", "planes"])
def test_codec_damaged_payload_raises(codec):
    data = byte_view(torch.randn(4096))
    stored = bytearray(_join(encode(codec, data, itemsize=4, is_float=True)))
    del stored[-10:]
    with pytest.raises(CorruptCheckpointError):
        decode(bytes(stored))


def test_codec_bad_header_raises():
    with pytest.raises(CorruptCheckpointError):
        parse_header(b"XXXX" + bytes(12))
    with pytest.raises(CorruptCheckpointError):
        parse_header(b"SRK1")
