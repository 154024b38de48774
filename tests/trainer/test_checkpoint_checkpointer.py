"""Checkpointer on a local volume: round trips, deduplication, async saves, retention,
corruption handling."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import blake3
import numpy as np
import pytest
import torch

from spotrun_trainer.checkpoint import Checkpointer, LocalStore
from spotrun_trainer.checkpoint import checkpointer as checkpointer_module
from spotrun_trainer.checkpoint.codec import HEADER_SIZE

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
]


def _random(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size(),),
        dtype=torch.uint8,
        generator=g,
    )
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)  # any bit pattern, NaN payloads included


def _chunk_files(root: Path) -> set[str]:
    return {p.name for p in (root / "chunks").glob("*/*") if not p.name.startswith(".tmp")}


@pytest.fixture
def ckpt(tmp_path: Path):
    checkpointer = Checkpointer(
        LocalStore(tmp_path), keep=3, chunk_bytes=64 << 10, small_bytes=4 << 10
    )
    yield checkpointer
    checkpointer.close()


@pytest.mark.parametrize("codec", ["raw", "zstd", "shuffle-zstd", "planes"])
def test_checkpointer_round_trip_is_bitwise_for_every_dtype(tmp_path, ckpt_assert_same, codec):
    # GIVEN tensors of every dtype, small (packed) and large (several chunks), plus a
    # non-contiguous view and plain values of every kind
    state = {
        "small": {str(d): _random(d, (3, 5), i) for i, d in enumerate(ALL_DTYPES)},
        "large": {str(d): _random(d, (301, 97), i) for i, d in enumerate(ALL_DTYPES)},
        "scalar": torch.tensor(7.5),
        "empty": torch.empty(0, 3),
        "transposed": _random(torch.float32, (40, 30), 99).t(),
        "plain": {
            1: None,
            "f": float("inf"),
            "n": float("nan"),
            "b": True,
            "s": "x/y",
            "t": (1, [2.5, "z"]),
            "bytes": b"\x00\x01",
        },
        "numpy": np.arange(12, dtype=np.int32).reshape(3, 4),
    }
    with Checkpointer(
        LocalStore(tmp_path), codec=codec, chunk_bytes=16 << 10, small_bytes=1 << 10
    ) as ckpt:
        # WHEN it is saved and restored without targets
        info = ckpt.save(5, state)
        restored = ckpt.restore()
    # THEN everything comes back identical, with the plain types kept
    assert info.step == 5 and info.location == "volume"
    assert restored is not None and restored.step == 5 and restored.skipped == []
    expected = dict(state, transposed=state["transposed"].contiguous())
    ckpt_assert_same(expected, restored.state)


def test_checkpointer_round_trip_of_training_state(ckpt, ckpt_make_state, ckpt_assert_same):
    state = ckpt_make_state(1)
    ckpt.save(3, state)
    restored = ckpt.restore()
    ckpt_assert_same(state, restored.state)
    # the optimizer's int keys survive, so load_state_dict accepts it
    assert set(restored.state["optimizer"]["state"]) == set(state["optimizer"]["state"])


def test_checkpointer_restore_into_reads_in_place(ckpt, ckpt_make_state):
    # GIVEN a saved model, and a fresh model of the same shape
    state = ckpt_make_state(1)
    ckpt.save(1, state)
    fresh = ckpt_make_state(2)["model"]
    pointers = {k: v.data_ptr() for k, v in fresh.items()}
    # WHEN restoring into the fresh model's tensors
    restored = ckpt.restore(into={"model": fresh})
    # THEN the fresh tensors hold the saved values and are the ones returned
    for key, tensor in fresh.items():
        assert torch.equal(tensor, state["model"][key])
        assert restored.state["model"][key].data_ptr() == pointers[key]


def test_checkpointer_restore_into_a_mismatched_target_allocates(ckpt):
    ckpt.save(1, {"w": torch.arange(6.0)})
    target = torch.zeros(3)
    restored = ckpt.restore(into={"w": target})
    assert torch.equal(restored.state["w"], torch.arange(6.0))
    assert torch.equal(target, torch.zeros(3))


def test_checkpointer_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    # GIVEN a model whose output layer shares the embedding's weight (as GPT-2 does)
    embedding = torch.nn.Embedding(300, 64)
    head = torch.nn.Linear(64, 300, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleDict({"wte": embedding, "head": head})
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        # WHEN saved and restored
        info = ckpt.save(1, {"model": model.state_dict()})
        restored = ckpt.restore()
    # THEN the bytes are written once and the restored tensors share memory
    assert info.bytes_total == embedding.weight.nbytes
    wte, tied = restored.state["model"]["wte.weight"], restored.state["model"]["head.weight"]
    assert torch.equal(wte, embedding.weight) and wte.data_ptr() == tied.data_ptr()


def test_checkpointer_unchanged_tensors_are_not_rewritten(tmp_path):
    # GIVEN a committed checkpoint of ten tensors
    state = {f"t{i}": _random(torch.float32, (64, 64), i) for i in range(10)}
    with Checkpointer(LocalStore(tmp_path), small_bytes=4 << 10) as ckpt:
        first = ckpt.save(1, state)
        # WHEN one tensor changes and the next step is saved
        state["t3"] = state["t3"] + 1
        second = ckpt.save(2, state)
    # THEN only that tensor's chunk and the manifest are written
    manifest = (tmp_path / "manifests" / f"{2:012d}.json").stat().st_size
    assert first.bytes_written > 10 * 64 * 64 * 4
    assert second.bytes_written == 64 * 64 * 4 + HEADER_SIZE + manifest
    assert second.bytes_total == first.bytes_total


def test_checkpointer_async_save_is_not_affected_by_later_mutation(ckpt, ckpt_assert_same):
    # GIVEN a state, and a copy of it as it is now
    state = {"w": torch.randn(256, 256), "b": torch.randn(10), "data": {"index": 1}}
    expected = {"w": state["w"].clone(), "b": state["b"].clone(), "data": {"index": 1}}
    # WHEN a background save starts and the state is changed right after it returns
    handle = ckpt.save_async(7, state)
    state["w"].add_(1.0)
    state["b"].zero_()
    state["data"]["index"] = 2
    info = handle.wait()
    # THEN the checkpoint holds the state as it was at the call
    assert info.step == 7 and handle.done() and info.stall_seconds <= info.seconds
    ckpt_assert_same(expected, ckpt.restore().state)


def test_checkpointer_second_async_save_waits_for_the_first(ckpt):
    first = ckpt.save_async(1, {"w": torch.randn(512, 512)})
    second = ckpt.save_async(2, {"w": torch.randn(512, 512)})
    assert first.done()  # the second call returned only after the first committed
    assert ckpt.wait().step == 2 and second.done()
    assert ckpt.wait() is None
    assert ckpt.latest_step() == 2


def test_checkpointer_wait_reraises_the_save_error(ckpt):
    ckpt.save_async(1, {"w": torch.ones(3)})
    ckpt.wait()
    ckpt._sinks[0].store.put_manifest = _raise  # the volume fails mid-save
    handle = ckpt.save_async(2, {"w": torch.zeros(3)})
    with pytest.raises(OSError, match="disk full"):
        ckpt.wait()
    with pytest.raises(OSError):
        handle.wait()
    assert ckpt.restore().step == 1


def _raise(*args, **kwargs):
    raise OSError("disk full")


def test_checkpointer_retention_keeps_newest_and_collects_chunks(tmp_path):
    # GIVEN keep=2 and leftovers of a crashed save (uncommitted manifest, temp file)
    root = tmp_path
    with Checkpointer(LocalStore(root), keep=2) as ckpt:
        ckpt.save(1, {"w": torch.full((100,), 1.0)})
        (root / "manifests" / f"{99:012d}.json").write_text("{}")
        (root / "chunks" / "ab").mkdir(exist_ok=True)
        (root / "chunks" / "ab" / ".tmp-abc.1234").write_bytes(b"torn")
        # WHEN four more steps are saved, each with new content
        for step in range(2, 6):
            ckpt.save(step, {"w": torch.full((100,), float(step)), "const": torch.ones(5)})
        restored = ckpt.restore()
    # THEN only the newest two manifests remain, and only their chunks
    assert sorted(p.name for p in (root / "manifests").iterdir()) == [
        f"{4:012d}.json",
        f"{5:012d}.json",
    ]
    referenced = set()
    for step in (4, 5):
        manifest = json.loads((root / "manifests" / f"{step:012d}.json").read_text())
        referenced |= {c[0] for e in manifest["tensors"].values() for c in e.get("chunks", [])}
    assert _chunk_files(root) == referenced
    assert not list(root.rglob(".tmp-*"))
    assert restored.step == 5 and torch.equal(restored.state["w"], torch.full((100,), 5.0))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _newest_only_chunk(root: Path) -> Path:
    m1 = json.loads((root / "manifests" / f"{1:012d}.json").read_text())
    m2 = json.loads((root / "manifests" / f"{2:012d}.json").read_text())
    old = {c[0] for e in m1["tensors"].values() for c in e.get("chunks", [])}
    new = [c[0] for e in m2["tensors"].values() for c in e.get("chunks", []) if c[0] not in old]
    return root / "chunks" / new[0][:2] / new[0]


@pytest.mark.parametrize(
    "damage", ["flip_chunk", "truncate_chunk", "delete_chunk", "flip_manifest", "truncate_manifest"]
)
def test_checkpointer_corrupt_checkpoint_is_skipped(tmp_path, caplog, damage):
    # GIVEN two committed checkpoints, the newest one damaged
    with Checkpointer(LocalStore(tmp_path), chunk_bytes=8 << 10) as ckpt:
        ckpt.save(1, {"w": torch.full((5000,), 1.0), "k": torch.arange(10)})
        ckpt.save(2, {"w": torch.full((5000,), 2.0), "k": torch.arange(10)})
    chunk = _newest_only_chunk(tmp_path)
    manifest = tmp_path / "manifests" / f"{2:012d}.json"
    if damage == "flip_chunk":
        _flip_byte(chunk, HEADER_SIZE + 100)
    elif damage == "truncate_chunk":
        chunk.write_bytes(chunk.read_bytes()[:-7])
    elif damage == "delete_chunk":
        chunk.unlink()
    elif damage == "flip_manifest":
        _flip_byte(manifest, manifest.stat().st_size // 2)
    else:
        manifest.write_bytes(manifest.read_bytes()[:200])
    # WHEN restoring with a new checkpointer (as after a relaunch)
    with caplog.at_level(logging.WARNING), Checkpointer(LocalStore(tmp_path)) as ckpt:
        restored = ckpt.restore()
    # THEN the damage is detected, logged, and the previous checkpoint is used
    assert restored.step == 1
    assert torch.equal(restored.state["w"], torch.full((5000,), 1.0))
    assert len(restored.skipped) == 1 and restored.skipped[0].startswith("volume:2:")
    assert "skipping checkpoint 2" in caplog.text


def test_checkpointer_rewrites_a_chunk_found_corrupt(tmp_path):
    # GIVEN a checkpoint whose chunk was damaged after it was written
    state = {"w": torch.full((5000,), 3.0)}
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        ckpt.save(1, state)
        (digest,) = {p.name for p in (tmp_path / "chunks").glob("*/*")}
        _flip_byte(tmp_path / "chunks" / digest[:2] / digest, HEADER_SIZE + 5)
        assert ckpt.restore() is None
        # WHEN the same content is saved again
        ckpt.save(2, state)
        # THEN the damaged chunk was rewritten rather than trusted
        assert ckpt.restore().step == 2


def test_checkpointer_damaged_pointer_falls_back_to_verified_manifests(tmp_path):
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        ckpt.save(1, {"w": torch.ones(4)})
        ckpt.save(2, {"w": torch.ones(4) * 2})
    (tmp_path / "LATEST").write_text("{not json")
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        restored = ckpt.restore()
    assert restored.step == 2 and restored.skipped[0].startswith("volume:LATEST")


def test_checkpointer_manifest_without_pointer_is_not_a_checkpoint(tmp_path):
    # GIVEN step 1 committed and a complete manifest of step 2 whose pointer never landed
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        ckpt.save(1, {"w": torch.ones(4)})
        pointer = (tmp_path / "LATEST").read_bytes()
        ckpt.save(2, {"w": torch.ones(4) * 2})
    (tmp_path / "LATEST").write_bytes(pointer)
    # WHEN restoring THEN step 2 does not exist
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.restore().step == 1


def test_checkpointer_empty_store_restores_none(tmp_path):
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        assert ckpt.restore() is None
        assert ckpt.latest_step() is None


@pytest.mark.parametrize("content_hash", ["xxh3-128", "blake3"])
def test_checkpointer_content_hash_is_recorded_and_used(tmp_path, content_hash):
    state = {"w": torch.randn(5000), "b": torch.randn(3)}
    with Checkpointer(LocalStore(tmp_path), content_hash=content_hash) as ckpt:
        ckpt.save(1, state)
    manifest = json.loads((tmp_path / "manifests" / f"{1:012d}.json").read_text())
    assert manifest["hash"] == content_hash
    width = {"xxh3-128": 32, "blake3": 64}[content_hash]
    assert {len(p.name) for p in (tmp_path / "chunks").glob("*/*")} == {width}
    # a checkpointer with the other default still restores it: the manifest says how
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        assert torch.equal(ckpt.restore().state["w"], state["w"])


def test_checkpointer_restores_a_manifest_that_predates_the_hash_field(tmp_path):
    # GIVEN a checkpoint whose manifest does not name its hash (written before the field
    # existed, when every chunk was named by blake3)
    state = {"w": torch.randn(5000)}
    with Checkpointer(LocalStore(tmp_path), content_hash="blake3") as ckpt:
        ckpt.save(1, state)
    path = tmp_path / "manifests" / f"{1:012d}.json"
    body = json.loads(path.read_text())
    del body["checksum"], body["hash"]
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    body["checksum"] = blake3.blake3(canonical.encode()).hexdigest()
    path.write_text(json.dumps(body))
    # WHEN it is restored by a checkpointer whose default is xxh3-128
    with Checkpointer(LocalStore(tmp_path)) as ckpt:
        restored = ckpt.restore()
    # THEN its chunks verify as blake3 ones
    assert restored is not None and restored.skipped == []
    assert torch.equal(restored.state["w"], state["w"])


class _SlowVolume(LocalStore):
    """A volume that takes chunks at 20 MB/s, like a throttled EBS volume."""

    def put_chunk(self, digest, parts):
        written = super().put_chunk(digest, parts)
        time.sleep(written / 20e6)
        return written


def test_checkpointer_auto_codec_compresses_for_a_slow_volume(tmp_path, monkeypatch):
    # GIVEN a volume far slower than compression, and saves big enough to measure it
    monkeypatch.setattr(checkpointer_module, "ADAPT_MIN_BYTES", 1 << 20)
    state = {"w": torch.randn(1 << 20) * 0.02}
    with Checkpointer(_SlowVolume(tmp_path), chunk_bytes=1 << 20) as ckpt:
        first = ckpt.save(1, state)
        state["w"].add_(1e-3)
        second = ckpt.save(2, state)
        restored = ckpt.restore()
    # THEN the first save, raw, showed the volume is slow; the next one compressed
    manifests = {
        step: json.loads((tmp_path / "manifests" / f"{step:012d}.json").read_text())
        for step in (1, 2)
    }
    assert manifests[1]["codec"] == "raw" and manifests[2]["codec"] == "planes"
    assert second.bytes_written < first.bytes_written
    # and a restore reads the compressed chunks back exactly
    assert torch.equal(restored.state["w"], state["w"])
