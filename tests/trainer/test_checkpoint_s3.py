"""S3 store on moto, and the Checkpointer with an S3 mirror."""

from __future__ import annotations

import json
import threading

import torch

from spotrun_trainer.checkpoint import Checkpointer, LocalStore, S3Store
from spotrun_trainer.checkpoint.codec import parse_header


def _keys(client, bucket: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def test_s3store_round_trip_and_layout(ckpt_s3, ckpt_make_state, ckpt_assert_same):
    # GIVEN an S3 store as the only sink
    client, bucket = ckpt_s3
    store = S3Store(f"s3://{bucket}/checkpoints/j-1/", s3_client=client)
    state = ckpt_make_state(3)
    with Checkpointer(store, small_bytes=4 << 10) as ckpt:
        # WHEN a checkpoint is saved and restored
        info = ckpt.save(12, state)
        restored = ckpt.restore()
    # THEN it round-trips, lives under the prefix in the contract's layout, and the
    # chunks are compressed with the S3 codec
    assert info.location == "s3" and restored.location == "s3"
    ckpt_assert_same(state, restored.state)
    keys = _keys(client, bucket)
    assert "checkpoints/j-1/LATEST" in keys
    assert "checkpoints/j-1/manifests/000000000012.json" in keys
    chunks = [k for k in keys if k.startswith("checkpoints/j-1/chunks/")]
    assert chunks and all(k.split("/")[-2] == k.split("/")[-1][:2] for k in chunks)
    body = client.get_object(Bucket=bucket, Key=chunks[0])["Body"].read()
    assert parse_header(body).codec == "planes"


def test_s3store_unchanged_chunks_are_not_uploaded_and_gc_runs(ckpt_s3):
    client, bucket = ckpt_s3
    store = S3Store(f"s3://{bucket}/p", s3_client=client)
    frozen = torch.randn(128, 128)
    with Checkpointer(store, keep=1, small_bytes=1 << 10) as ckpt:
        first = ckpt.save(1, {"frozen": frozen, "w": torch.zeros(64, 64)})
        second = ckpt.save(2, {"frozen": frozen, "w": torch.ones(64, 64)})
    assert second.bytes_written < first.bytes_written / 2
    keys = _keys(client, bucket)
    assert [k for k in keys if "/manifests/" in k] == ["p/manifests/000000000002.json"]
    assert len([k for k in keys if "/chunks/" in k]) == 2


def test_checkpointer_mirror_commits_on_volume_and_s3(tmp_path, ckpt_s3, ckpt_make_state):
    client, bucket = ckpt_s3
    mirror = S3Store(f"s3://{bucket}/m/", s3_client=client)
    with Checkpointer(LocalStore(tmp_path), mirror=mirror) as ckpt:
        info = ckpt.save(4, ckpt_make_state(0))
    assert info.location == "volume+s3" and info.mirror_error is None
    assert set(info.bytes_by_location) == {"volume", "s3"}
    # the S3 copy is compressed, the volume copy raw
    assert info.bytes_by_location["s3"] < info.bytes_by_location["volume"]
    assert (tmp_path / "LATEST").exists() and "m/LATEST" in _keys(client, bucket)


def test_checkpointer_restore_picks_the_newer_of_volume_and_s3(tmp_path, ckpt_s3):
    client, bucket = ckpt_s3
    mirror = S3Store(f"s3://{bucket}/m/", s3_client=client)
    # GIVEN a volume at step 5, and S3 at step 7 (saved from an instance in another AZ)
    with Checkpointer(LocalStore(tmp_path / "old-volume"), mirror=mirror) as ckpt:
        ckpt.save(5, {"w": torch.full((10,), 5.0)})
    with Checkpointer(LocalStore(tmp_path / "other-az"), mirror=mirror) as ckpt:
        ckpt.save(7, {"w": torch.full((10,), 7.0)})
    # WHEN restoring from the old volume with the mirror
    with Checkpointer(LocalStore(tmp_path / "old-volume"), mirror=mirror) as ckpt:
        assert ckpt.latest_step() == 7
        restored = ckpt.restore()
    # THEN S3's newer step wins
    assert restored.step == 7 and restored.location == "s3"
    assert torch.equal(restored.state["w"], torch.full((10,), 7.0))
    # AND with the volume newer, the volume wins
    with Checkpointer(LocalStore(tmp_path / "other-az"), mirror=mirror) as ckpt:
        ckpt.save(9, {"w": torch.full((10,), 9.0)})
    only_volume = Checkpointer(LocalStore(tmp_path / "other-az"))
    only_volume.save(11, {"w": torch.full((10,), 11.0)})
    only_volume.close()
    with Checkpointer(LocalStore(tmp_path / "other-az"), mirror=mirror) as ckpt:
        restored = ckpt.restore()
    assert restored.step == 11 and restored.location == "volume"


def test_checkpointer_falls_back_to_s3_when_the_volume_copy_is_corrupt(tmp_path, ckpt_s3):
    client, bucket = ckpt_s3
    mirror = S3Store(f"s3://{bucket}/m/", s3_client=client)
    with Checkpointer(LocalStore(tmp_path), mirror=mirror) as ckpt:
        ckpt.save(3, {"w": torch.full((1000,), 3.0)})
    for chunk in (tmp_path / "chunks").glob("*/*"):
        chunk.write_bytes(chunk.read_bytes()[:-1])  # torn on the volume
    with Checkpointer(LocalStore(tmp_path), mirror=mirror) as ckpt:
        restored = ckpt.restore()
    assert restored.step == 3 and restored.location == "s3"
    assert restored.skipped and restored.skipped[0].startswith("volume:3:")


def test_checkpointer_mirror_failure_keeps_the_volume_commit(tmp_path, ckpt_s3):
    client, _ = ckpt_s3
    mirror = S3Store("s3://no-such-bucket/m/", s3_client=client)
    with Checkpointer(LocalStore(tmp_path), mirror=mirror) as ckpt:
        info = ckpt.save(1, {"w": torch.ones(3)})
        restored = ckpt.restore()
    assert info.location == "volume" and "NoSuchBucket" in info.mirror_error
    assert restored.step == 1 and restored.location == "volume"


class _GatedS3Store(S3Store):
    """An S3 mirror whose chunk uploads wait at a gate: an upload still in progress."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started = threading.Event()
        self.uploads = 0

    def put_chunk(self, digest, parts):
        self.started.set()
        self.gate.wait(timeout=30)
        self.uploads += 1
        return super().put_chunk(digest, parts)


def test_checkpointer_hurry_stops_the_mirror_and_commits_the_volume_first(
    tmp_path, ckpt_s3, ckpt_make_state
):
    # GIVEN a mirrored checkpointer with step 1 on both sinks, and step 2's async save
    # stuck uploading many chunks to S3 when the spot notice comes
    client, bucket = ckpt_s3
    mirror = _GatedS3Store(f"s3://{bucket}/m/", s3_client=client)
    state = {f"t{i}": torch.randn(64, 64) for i in range(16)}
    with Checkpointer(
        LocalStore(tmp_path), mirror=mirror, small_bytes=1, chunk_bytes=1 << 12, workers=2
    ) as ckpt:
        mirror.gate.set()
        ckpt.save(1, state)
        mirror.gate.clear()
        uploads_of_step_1 = mirror.uploads
        for t in state.values():
            t.add_(1.0)
        handle = ckpt.save_async(2, state)
        assert mirror.started.wait(timeout=30)
        # WHEN the notice hurries the checkpointer, and the upload's gate opens
        ckpt.hurry()
        mirror.gate.set()
        in_flight = handle.wait(timeout=60)
        notice = ckpt.save(3, state)
    # THEN step 2 is committed on the volume only, its upload stopped short,
    assert in_flight.location == "volume" and "spot notice" in in_flight.mirror_error
    assert mirror.uploads - uploads_of_step_1 < len(state) * 4
    # the notice's step 3 went to the volume alone, at once,
    assert notice.location == "volume" and notice.mirror_error
    # and S3 still holds its last whole checkpoint, step 1
    pointer = client.get_object(Bucket=bucket, Key="m/LATEST")["Body"].read()
    assert json.loads(pointer)["step"] == 1
    fresh_mirror = S3Store(f"s3://{bucket}/m/", s3_client=client)
    with Checkpointer(LocalStore(tmp_path), mirror=fresh_mirror) as ckpt:
        assert ckpt.restore().step == 3
