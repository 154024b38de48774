"""The checkpointer: orders staging, chunk writes, manifest, pointer, retention and restore."""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import codec as codecs
from .chunking import (
    CONTENT_HASHES,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CONTENT_HASH,
    DEFAULT_PACK_BYTES,
    DEFAULT_SMALL_BYTES,
    ChunkObject,
    Plan,
    hash_bytes,
    plan_chunks,
    tensor_checksum,
)
from .errors import CheckpointError, CorruptCheckpointError
from .flatten import flatten, unflatten
from .manifest import ChunkRef, Manifest, TensorEntry, parse_pointer, pointer_bytes
from .staging import StagingArea, byte_view
from .storage.base import Store

logger = logging.getLogger(__name__)


@dataclass
class CommitInfo:
    """A committed checkpoint. ``seconds`` runs from the call to the last durable pointer;
    ``stall_seconds`` is how long the caller was blocked; ``bytes_written`` counts bytes
    actually stored on every sink (chunks already present cost nothing), per sink in
    ``bytes_by_location``; ``bytes_total`` is the raw size of the state's tensors."""

    step: int
    seconds: float
    stall_seconds: float
    bytes_written: int
    bytes_total: int
    location: str  # "volume" | "s3" | "volume+s3"
    bytes_by_location: dict[str, int] = field(default_factory=dict)
    mirror_error: str | None = None


@dataclass
class Restored:
    step: int
    state: dict[str, Any]
    location: str  # where the restored checkpoint was read from: "volume" | "s3"
    skipped: list[str]  # "<location>:<step>: <reason>" for each checkpoint passed over


class SaveHandle:
    """A save running in the background; ``wait`` returns its CommitInfo or raises."""

    def __init__(self, step: int, future: futures.Future[CommitInfo]) -> None:
        self.step = step
        self._future = future

    def wait(self, timeout: float | None = None) -> CommitInfo:
        return self._future.result(timeout)

    def done(self) -> bool:
        return self._future.done()

    def __repr__(self) -> str:
        return f"SaveHandle(step={self.step}, done={self.done()})"


@dataclass
class _Sink:
    store: Store
    codec: str
    # chunks this process knows the store holds: digest -> (codec, stored length)
    known: dict[str, tuple[str, int]] = field(default_factory=dict)
    suspect: set[str] = field(default_factory=set)  # failed verification: rewrite them
    manifests: dict[int, Manifest] = field(default_factory=dict)
    adaptive: bool = False  # "auto" on a raw sink: compress if it proves slow


# A raw sink that writes slower than half of what the ``planes`` codec can encode on
# this machine's cores is a slow volume (a gp3 at its 125 MiB/s baseline, say):
# compressing first then saves time. Measured here: 630 MB/s per core (level 1,
# byte planes, 1.19x on fp32 weights); this disk takes raw chunks at over 2 GB/s.
PLANES_BYTES_PER_SECOND_PER_CORE = 630e6
# Only a save of at least this many new bytes is a measurement of throughput, not of
# fsync latency.
ADAPT_MIN_BYTES = 64 << 20


def _results(jobs: list[futures.Future[Any]]) -> list[Any]:
    """Results of all jobs; on a failure, raise only once every job has stopped, so no
    straggler still reads staging buffers (or writes restore targets) afterwards."""
    futures.wait(jobs)
    return [job.result() for job in jobs]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"unknown dtype {name!r}")
    return dtype


class Checkpointer:
    """Saves and restores training state in a content-addressed store.

    Order of operations of one save, per sink (primary first, then the mirror):

    1. flatten the state (plain values serialised to the manifest tree at once);
    2. stage: copy every tensor into reused CPU buffers (``save_async`` only; the only
       part that blocks training), tied tensors recorded once as aliases;
    3. split tensors into chunk objects (large tensors in chunks of ``chunk_bytes``,
       small ones packed) and name each by the xxh3-128 of its raw bytes;
    4. write each chunk the sink does not hold yet (encoded with the sink's codec;
       local: temp file, fdatasync, rename), in parallel; then make them durable
       (``sync_chunks``: one fsync per touched folder);
    5. write the manifest (durable on return);
    6. replace ``LATEST`` atomically — **the commit point**: before it, the step does
       not exist for ``restore``; after it, it does;
    7. retention: drop manifests beyond the newest ``keep`` committed ones (and any
       uncommitted leftover), then delete chunks no kept manifest refers to.

    Saves are serialised (at most one in flight), and GC runs inside the save after its
    commit, so no manifest is ever being written while chunks are collected; one
    Checkpointer is assumed to own its stores. A mirror failure does not undo the
    primary commit: the CommitInfo then says ``location="volume"`` and carries
    ``mirror_error``.

    ``save_async`` called while a save is in flight **waits** for that save first (its
    wait counts as stall): a committed step is never superseded, and the staging
    buffers are reused only once the previous save no longer reads them. ``save`` and
    ``restore`` also wait for it. The error of a save nobody waited for is logged when
    it happens and is not raised by a later call.

    Steps are expected to increase: the pointer names the step saved last, and
    retention keeps the ``keep`` newest manifests at or below it, so saving an older
    step (a deliberate rollback) makes it the newest and collects its successors.

    ``codec="auto"`` writes raw chunks to a ``LocalStore`` (this disk outruns zstd on
    these cores) until a save shows the volume is slower than compression (then
    ``planes``: see ``_adapt_codec``), and the ``planes`` codec to an ``S3Store``; any
    other name from ``codec.CODECS`` applies to every sink. Memory: ``save_async`` keeps one staging
    copy of the state's tensors between saves.
    """

    def __init__(
        self,
        primary: Store,
        *,
        mirror: Store | None = None,
        keep: int = 3,
        codec: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        small_bytes: int = DEFAULT_SMALL_BYTES,
        pack_bytes: int = DEFAULT_PACK_BYTES,
        workers: int | None = None,
        content_hash: str = DEFAULT_CONTENT_HASH,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        if codec != "auto" and codec not in codecs.CODECS:
            raise ValueError(f"unknown codec {codec!r}; choose auto or one of {codecs.CODECS}")
        stores = [primary] if mirror is None else [primary, mirror]
        self._sinks = [
            _Sink(
                s,
                s.default_codec if codec == "auto" else codec,
                adaptive=codec == "auto" and s.default_codec == "raw",
            )
            for s in stores
        ]
        self.keep = keep
        if content_hash not in CONTENT_HASHES:
            raise ValueError(f"unknown content hash {content_hash!r}; choose {CONTENT_HASHES}")
        self._content_hash = content_hash
        self._chunk_bytes = chunk_bytes
        self._small_bytes = small_bytes
        self._pack_bytes = pack_bytes
        # Threads, not processes: hashing, zstd, file I/O and memcpy release the GIL.
        self._workers = workers or max(4, 2 * (os.cpu_count() or 1))
        self._pool = futures.ThreadPoolExecutor(
            max_workers=self._workers, thread_name_prefix="ckpt-io"
        )
        self._saver = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-save")
        self._staging = StagingArea()
        self._lock = threading.Lock()  # guards _in_flight
        # Held by save, save_async and restore: a save requested from another thread
        # (the interruption watcher) queues behind the current one instead of racing it
        # for the staging buffers.
        self._api_lock = threading.RLock()
        self._in_flight: SaveHandle | None = None
        self._closed = False
        # Set by hurry(): mirror work stops, so the primary commit of a notice's save
        # does not queue behind an upload.
        self._hurry = threading.Event()

    # saving -------------------------------------------------------------------------

    def save(self, step: int, state: Mapping[Any, Any]) -> CommitInfo:
        """Save synchronously; returns once the checkpoint is durable on every sink
        (on the primary alone after :meth:`hurry`: ``mirror_error`` then says so)."""
        start = time.perf_counter()
        with self._api_lock:
            self._check_open()
            self._settle_in_flight()
            tensors, tree = flatten(state)
            # The caller is blocked until the end, so its own memory is written directly.
            staged, aliases = self._staging.stage(tensors, copy=False)
            return self._write(step, staged, aliases, tree, tensors, start, stall=None)

    def hurry(self) -> None:
        """Put the primary first from now on: mirror uploads stop (the in-flight save's
        too, between chunks) and saves commit to the primary only.

        For a spot notice: the volume commit is what must happen inside the notice,
        and the control plane snapshots the volume; the mirror keeps its last
        committed checkpoint, which restore passes over for the newer one.
        """
        self._hurry.set()

    def save_async(self, step: int, state: Mapping[Any, Any]) -> SaveHandle:
        """Stage the state and write it in the background; blocks only while staging
        (and while a previous save is still running: see the class docstring)."""
        start = time.perf_counter()
        with self._api_lock:
            self._check_open()
            self._settle_in_flight()
            tensors, tree = flatten(state)
            staged, aliases = self._staging.stage(tensors, copy=True)
            stall = time.perf_counter() - start
            future = self._saver.submit(
                self._write, step, staged, aliases, tree, tensors, start, stall
            )
            handle = SaveHandle(step, future)
            with self._lock:
                self._in_flight = handle
            return handle

    def wait(self) -> CommitInfo | None:
        """Wait for the in-flight save; re-raises its error. None when nothing is in flight."""
        with self._lock:
            handle, self._in_flight = self._in_flight, None
        return None if handle is None else handle.wait()

    def _settle_in_flight(self) -> None:
        # Already logged by the save itself; a failed save must not stop a new one.
        with contextlib.suppress(Exception):
            self.wait()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError("checkpointer is closed")

    def _write(
        self,
        step: int,
        staged: dict[str, torch.Tensor],
        aliases: dict[str, str],
        tree: dict[str, Any],
        originals: dict[str, torch.Tensor],
        start: float,
        stall: float | None,
    ) -> CommitInfo:
        try:
            plan = plan_chunks(
                staged,
                chunk_bytes=self._chunk_bytes,
                small_bytes=self._small_bytes,
                pack_bytes=self._pack_bytes,
                algorithm=self._content_hash,
            )
            by_location: dict[str, int] = {}
            committed: list[str] = []
            mirror_error = None
            for i, sink in enumerate(self._sinks):
                if i > 0 and self._hurry.is_set():
                    mirror_error = "not mirrored: the primary commit came first (spot notice)"
                    continue
                try:
                    commit_start = time.perf_counter()
                    written = self._commit(sink, step, plan, staged, aliases, originals, tree)
                    self._adapt_codec(sink, written, time.perf_counter() - commit_start)
                except Exception as error:
                    if i == 0:
                        raise
                    mirror_error = f"{type(error).__name__}: {error}"
                    logger.warning(
                        "checkpoint step %d not mirrored to %s: %s",
                        step,
                        sink.store.describe(),
                        mirror_error,
                    )
                    continue
                by_location[sink.store.location] = by_location.get(sink.store.location, 0) + written
                committed.append(sink.store.location)
            seconds = time.perf_counter() - start
            for sink in self._sinks:
                if sink.store.location in committed:
                    self._retain(sink, step)
            return CommitInfo(
                step=step,
                seconds=seconds,
                stall_seconds=seconds if stall is None else stall,
                bytes_written=sum(by_location.values()),
                bytes_total=plan.nbytes,
                location="+".join(committed),
                bytes_by_location=by_location,
                mirror_error=mirror_error,
            )
        except Exception:
            logger.exception("checkpoint step %d failed", step)
            raise

    def _put_object(
        self, sink: _Sink, obj: ChunkObject, listing: dict[str, int] | None
    ) -> tuple[str, int, int]:
        """Store one chunk unless the sink holds it; returns (codec, stored length, written)."""
        if sink is not self._sinks[0] and self._hurry.is_set():
            raise CheckpointError("mirror upload stopped: a spot notice came first")
        digest = obj.ensure_digest()
        store = sink.store
        if digest not in sink.suspect:
            size = listing.get(digest) if listing is not None else store.chunk_size(digest)
            if size is not None:
                known = sink.known.get(digest)
                if known is not None and known[1] == size:
                    return known[0], size, 0
                header = codecs.parse_header(store.get_chunk_header(digest, codecs.HEADER_SIZE))
                return header.codec, size, 0
        if sink.codec == "raw":
            parts = [codecs.raw_header(obj.length), *obj.parts]  # no copy of a pack
        else:
            data = obj.parts[0] if len(obj.parts) == 1 else np.concatenate(obj.parts)
            parts = codecs.encode(sink.codec, data, itemsize=obj.itemsize, is_float=obj.is_float)
        written = store.put_chunk(digest, parts)
        sink.suspect.discard(digest)
        return sink.codec, written, written

    def _commit(
        self,
        sink: _Sink,
        step: int,
        plan: Plan,
        staged: dict[str, torch.Tensor],
        aliases: dict[str, str],
        originals: dict[str, torch.Tensor],
        tree: dict[str, Any],
    ) -> int:
        store = sink.store
        # One LIST beats a HEAD per chunk on S3; a local stat per chunk is cheaper still.
        listing = store.list_chunks() if store.prefers_listing else None
        jobs = [self._pool.submit(self._put_object, sink, obj, listing) for obj in plan.objects]
        results = _results(jobs)
        store.sync_chunks()  # every chunk durable before the manifest can name it
        written = sum(r[2] for r in results)

        entries: dict[str, TensorEntry] = {}
        for name, t in originals.items():
            if name in aliases:
                entries[name] = TensorEntry(
                    _dtype_name(t.dtype), tuple(t.shape), alias_of=aliases[name]
                )
                continue
            refs = []
            for p in plan.pieces[name]:
                obj = plan.objects[p.index]
                codec, stored, _ = results[p.index]
                refs.append(ChunkRef(obj.digest, p.object_offset, p.length, stored, codec))
            st = staged[name]
            entries[name] = TensorEntry(
                _dtype_name(st.dtype), tuple(st.shape), tuple(refs), plan.tensor_checksum(name)
            )
        manifest = Manifest(
            step=step, tensors=entries, tree=tree, codec=sink.codec, hash=plan.algorithm
        )
        data = manifest.to_bytes()
        store.put_manifest(step, data)
        store.replace_pointer(pointer_bytes(step))  # COMMIT POINT
        for obj, (codec, stored, _) in zip(plan.objects, results, strict=True):
            sink.known[obj.digest] = (codec, stored)
        sink.manifests[step] = manifest
        return written + len(data)

    def _adapt_codec(self, sink: _Sink, written: int, seconds: float) -> None:
        """Switch an "auto" raw sink to ``planes`` once a save shows it is slow.

        One way: compressed writes measure the codec too, so the choice is not
        revisited. Restore reads either kind; each chunk's header names its codec.
        """
        if not sink.adaptive or sink.codec != "raw" or written < ADAPT_MIN_BYTES:
            return
        cores = min(os.cpu_count() or 1, self._workers)
        throughput = written / max(seconds, 1e-9)
        if throughput < PLANES_BYTES_PER_SECOND_PER_CORE * cores / 2:
            sink.codec = "planes"
            logger.info(
                "%s takes %.0f MB/s: compressing its chunks from now on",
                sink.store.describe(),
                throughput / 1e6,
            )

    # retention ----------------------------------------------------------------------

    def _retain(self, sink: _Sink, committed: int) -> None:
        store = sink.store
        try:
            steps = store.list_manifests()
            kept = [s for s in steps if s <= committed][-self.keep :]
            # Manifests go first: a crash midway leaves unreferenced chunks (collected
            # next time), never a manifest whose chunks are gone.
            dropped = [s for s in steps if s not in kept]
            for s in dropped:
                store.delete_manifest(s)
                sink.manifests.pop(s, None)
            if dropped:
                store.sync_deletions()
            referenced: set[str] = set()
            for s in kept:
                manifest = sink.manifests.get(s)
                if manifest is None:
                    try:
                        manifest = Manifest.from_bytes(store.get_manifest(s))
                    except CorruptCheckpointError:
                        continue  # unreadable: its chunks cannot be known, nor restored
                    sink.manifests[s] = manifest
                referenced |= manifest.chunk_hashes()
            garbage = [d for d in store.list_chunks() if d not in referenced]
            store.delete_chunks(garbage)
            for d in garbage:
                sink.known.pop(d, None)
            store.clean_temporary()
        except Exception as error:  # retention never fails a committed save
            logger.warning("retention on %s failed: %s", store.describe(), error)

    # restoring ----------------------------------------------------------------------

    def latest_step(self) -> int | None:
        """The newest committed step on any sink (from the pointers, not verified)."""
        steps = []
        for sink in self._sinks:
            try:
                data = sink.store.get_pointer()
                if data is not None:
                    steps.append(parse_pointer(data))
            except Exception as error:
                logger.warning("cannot read LATEST of %s: %s", sink.store.describe(), error)
        return max(steps, default=None)

    def _candidates(self, skipped: list[str]) -> list[tuple[int, int]]:
        found = []
        for index, sink in enumerate(self._sinks):
            store = sink.store
            try:
                data = store.get_pointer()
                if data is None:
                    continue  # nothing ever committed here
                steps = store.list_manifests()
                try:
                    committed = parse_pointer(data)
                    steps = [s for s in steps if s <= committed]
                except CorruptCheckpointError as error:
                    # Every manifest is verified in full before use, so with a damaged
                    # pointer the newest one that verifies is still a sound choice.
                    logger.warning("%s: %s; trying every manifest", store.describe(), error)
                    skipped.append(f"{store.location}:LATEST: {error}")
            except Exception as error:
                logger.warning("cannot list checkpoints on %s: %s", store.describe(), error)
                skipped.append(f"{store.location}: {error}")
                continue
            found.extend((s, index) for s in steps)
        # newest first; on a tie the primary (the volume) wins, it is the faster read
        return sorted(found, key=lambda c: (-c[0], c[1]))

    def restore(self, into: Mapping[Any, Any] | None = None) -> Restored | None:
        """Load the newest checkpoint that verifies, from the primary or the mirror.

        Tensors of ``into`` (a state shaped like the saved one) with the same name,
        dtype and shape are filled in place; others are allocated. A checkpoint that
        fails verification is logged, listed in ``skipped`` and passed over; when one
        was passed over, tensors of ``into`` may have been overwritten by it before the
        next candidate overwrote them again.
        """
        with self._api_lock:
            self._check_open()
            self._settle_in_flight()
            return self._restore(into)

    def _restore(self, into: Mapping[Any, Any] | None) -> Restored | None:
        skipped: list[str] = []
        targets = flatten(into)[0] if into is not None else {}
        for step, index in self._candidates(skipped):
            sink = self._sinks[index]
            try:
                state = self._load(sink, step, targets)
            except Exception as error:
                reason = f"{type(error).__name__}: {error}"
                logger.warning(
                    "skipping checkpoint %d on %s: %s", step, sink.store.describe(), reason
                )
                skipped.append(f"{sink.store.location}:{step}: {reason}")
                continue
            return Restored(step=step, state=state, location=sink.store.location, skipped=skipped)
        return None

    def _load(self, sink: _Sink, step: int, targets: dict[str, torch.Tensor]) -> Any:
        store = sink.store
        manifest = Manifest.from_bytes(store.get_manifest(step))
        if manifest.step != step:
            raise CorruptCheckpointError(f"manifest file of step {step} holds {manifest.step}")
        result: dict[str, torch.Tensor] = {}
        copy_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        # digest -> [(destination bytes, offset in chunk, length)]
        reads: dict[str, list[tuple[np.ndarray, int, int]]] = {}
        for name, entry in manifest.tensors.items():
            if entry.alias_of is not None:
                continue
            dtype, shape = _dtype(entry.dtype), entry.shape
            dest = self._destination(targets.get(name), dtype, shape, copy_back)
            view = byte_view(dest)
            if entry.nbytes != view.size:
                raise CorruptCheckpointError(f"{name}: chunks do not cover the tensor")
            pos = 0
            for ref in entry.chunks:
                reads.setdefault(ref.hash, []).append(
                    (view[pos : pos + ref.length], ref.offset, ref.length)
                )
                pos += ref.length
            result[name] = dest
        _results(
            [
                self._pool.submit(self._read_chunk, sink, d, r, manifest.hash)
                for d, r in reads.items()
            ]
        )
        for name, entry in manifest.tensors.items():
            pieces = [(c.hash, c.offset, c.length) for c in entry.chunks]
            if entry.alias_of is None and tensor_checksum(pieces) != entry.checksum:
                raise CorruptCheckpointError(f"tensor {name} checksum mismatch")
        for name, entry in manifest.tensors.items():
            if entry.alias_of is not None:
                if entry.alias_of not in result:
                    raise CorruptCheckpointError(f"{name} aliases missing {entry.alias_of}")
                source = result[entry.alias_of]
                target = targets.get(name)
                if (
                    target is not None
                    and target.shape == source.shape
                    and (target.dtype == source.dtype)
                ):
                    if target.data_ptr() != source.data_ptr():
                        with torch.no_grad():
                            target.copy_(source)
                    result[name] = target
                else:
                    result[name] = source
        with torch.no_grad():
            for target, temp in copy_back:
                target.copy_(temp)
        for target, temp in copy_back:
            for name, t in result.items():
                if t is temp:
                    result[name] = target
        for ref in (c for e in manifest.tensors.values() for c in e.chunks):
            sink.known[ref.hash] = (ref.codec, ref.stored_length)
        sink.manifests[step] = manifest
        return unflatten(manifest.tree, result)

    @staticmethod
    def _destination(
        target: torch.Tensor | None,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        copy_back: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        if target is not None and target.dtype == dtype and tuple(target.shape) == shape:
            if target.device.type == "cpu" and target.is_contiguous():
                return target.detach()  # read straight into the caller's memory
            temp = torch.empty(shape, dtype=dtype)
            copy_back.append((target, temp))
            return temp
        return torch.empty(shape, dtype=dtype)

    def _read_chunk(
        self, sink: _Sink, digest: str, pieces: list[tuple[np.ndarray, int, int]], algorithm: str
    ) -> None:
        store = sink.store
        try:
            if len(pieces) == 1 and pieces[0][1] == 0:
                dest = pieces[0][0]
                store.read_chunk_into(digest, dest)
                got = hash_bytes(dest, algorithm=algorithm)
            else:
                data = codecs.decode(store.get_chunk(digest))
                got = hash_bytes(data, algorithm=algorithm)
                for dest, offset, length in pieces:
                    dest[:] = data[offset : offset + length]
        except CorruptCheckpointError:
            sink.suspect.add(digest)
            raise
        if got != digest:
            sink.suspect.add(digest)
            raise CorruptCheckpointError(f"chunk {digest} content does not match its hash")

    def close(self) -> None:
        """Wait for the in-flight save (re-raising its error), then stop the threads."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._saver.shutdown(wait=True)
            self._pool.shutdown(wait=True)
            self._staging.clear()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
