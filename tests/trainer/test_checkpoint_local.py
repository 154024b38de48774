"""The local-folder storage backend."""

from __future__ import annotations

import numpy as np
import pytest

from spotrun_trainer.checkpoint import ChunkMissingError, LocalStore
from spotrun_trainer.checkpoint.codec import encode


def test_localstore_chunks_put_get_list_delete(tmp_path):
    store = LocalStore(tmp_path)
    data = np.arange(100, dtype=np.uint8)
    parts = encode("raw", data)
    digest = "ab" + "0" * 62
    assert store.chunk_size(digest) is None
    written = store.put_chunk(digest, parts)
    store.sync_chunks()
    assert written == 116 and store.chunk_size(digest) == 116
    assert (tmp_path / "chunks" / "ab" / digest).exists()
    assert store.list_chunks() == {digest: 116}
    out = np.zeros(100, np.uint8)
    store.read_chunk_into(digest, out)
    assert out.tobytes() == data.tobytes()
    store.delete_chunks([digest])
    assert store.list_chunks() == {}
    with pytest.raises(ChunkMissingError):
        store.get_chunk(digest)


def test_localstore_pointer_replace_is_atomic_and_leaves_no_temp(tmp_path):
    store = LocalStore(tmp_path)
    assert store.get_pointer() is None
    store.replace_pointer(b"one")
    store.replace_pointer(b"two")
    assert store.get_pointer() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "chunks", "manifests"]


def test_localstore_manifests_listed_by_step(tmp_path):
    store = LocalStore(tmp_path)
    for step in (3, 1, 20):
        store.put_manifest(step, b"{}")
    (tmp_path / "manifests" / ".tmp-000000000004.json.x").write_bytes(b"")
    assert store.list_manifests() == [1, 3, 20]
    store.delete_manifest(3)
    assert store.list_manifests() == [1, 20]
    store.clean_temporary()
    assert not list(tmp_path.rglob(".tmp-*"))
