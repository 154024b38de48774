"""Checkpoint benchmark: spotrun's store against torch.save, safetensors, DCP and the disk floor.

Run: ``make bench`` (``make bench-smoke`` for a small model), or
``PYTHONPATH=trainer python bench/checkpoint.py [--params N] [--runs N] [--dir PATH]``
from the repository's root. The model is
GPT-2-small-like (124M params, tied embedding, fp32) after a few AdamW steps: about
1.5 GB of state. Every write is fsynced before its clock stops; cold reads follow a
page-cache drop. The last line of output is one JSON object: the ratios (medians of
``--runs`` runs) next to their targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spotrun_trainer.checkpoint import Checkpointer, LocalStore, S3Store
from spotrun_trainer.checkpoint.flatten import flatten
from spotrun_trainer.checkpoint.staging import byte_view, find_aliases

TARGETS = {
    "durable_save_vs_raw_floor": 1.15,
    "durable_save_vs_torch_save": 0.8,
    "stall_vs_torch_save": 0.15,
    "restore_vs_torch_load": 1.0,
    "incremental_bytes_vs_changed": 1.05,
    "s3_bytes_vs_raw_fp32": 0.85,
    "s3_bytes_vs_raw_bf16": 0.70,
}
GPT2_SMALL = 124_439_808


# -- the model -------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.attn_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, context: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1])
        x = self.wte(tokens) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_model(params: int) -> GPT:
    if params >= GPT2_SMALL:
        return GPT(50257, 1024, 768, 12, 12)
    # a scaled-down model: params ~ 12 * layers * width^2 + (vocab + context) * width
    layers, vocab, context = (12, 50257, 1024) if params > 40_000_000 else (2, 1024, 256)
    a, b = 12 * layers, vocab + context
    width = max(16, int((-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)) // 16 * 16)
    return GPT(vocab, context, width, layers, heads=4 if width % 4 == 0 else 1)


def train(model: GPT, optimizer: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    vocab = model.wte.num_embeddings
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (2, 64), generator=g)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def training_state(model: GPT, optimizer: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "data": {"epoch": 0, "index": step},
    }


def unique_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state's tensors by name, tied duplicates removed (safetensors refuses them)."""
    tensors, _ = flatten(state)
    aliases = find_aliases(tensors)
    return {n: t for n, t in tensors.items() if n not in aliases}


# -- measuring -------------------------------------------------------------------------


def fsync_path(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    folder = path if path.is_dir() else path.parent
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _can_drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


COLD_METHOD = "posix_fadvise"  # set in main(): drop_caches when this host allows it


def make_cold(path: Path) -> None:
    """Evict a file's (or folder's) pages from the page cache, so the next read hits disk."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:  # the pages are clean (fsynced), so DONTNEED really drops them
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if COLD_METHOD == "drop_caches":
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


@contextlib.contextmanager
def scratch(root: Path, name: str) -> Iterator[Path]:
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def raw_floor(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The same bytes, written back to back into one file, fsynced: the disk's floor."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for t in tensors.values():
            view = memoryview(byte_view(t.contiguous()))
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def torch_save(state: dict[str, Any], path: Path) -> None:
    torch.save(state, path)
    fsync_path(path)


def safetensors_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    fsync_path(path)


def dcp_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    writer = dcp.FileSystemWriter(str(path), thread_count=2, sync_files=True)
    dcp.save(dict(tensors), storage_writer=writer)
    fsync_path(path)


def median(values: list[float]) -> float:
    return statistics.median(values)


def log(message: str) -> None:
    print(message, flush=True)


# -- scenarios -------------------------------------------------------------------------


def bench_local(
    state: dict[str, Any], root: Path, runs: int, train_step: Callable[[], None]
) -> dict[str, list[float]]:
    tensors = unique_tensors(state)
    times: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        times.setdefault(name, []).append(seconds)
        log(f"  {name:<28} {seconds:7.3f} s")

    def spotrun(d: Path, step: int) -> None:
        with Checkpointer(LocalStore(d), keep=1) as ckpt:
            seconds, info = timed(lambda: ckpt.save(step, state))
        record("spotrun_save", seconds)
        assert info.bytes_written >= info.bytes_total
        with Checkpointer(LocalStore(d)) as ckpt:
            make_cold(d)
            seconds, restored = timed(lambda: ckpt.restore(into=state))
            record("spotrun_restore_into_cold", seconds)
            assert restored is not None and restored.step == step
            make_cold(d)
            seconds, restored = timed(lambda: ckpt.restore())
            record("spotrun_restore_alloc_cold", seconds)
            del restored

    def torch_pair(d: Path, step: int) -> None:
        record("torch_save", timed(lambda: torch_save(state, d / "state.pt"))[0])
        make_cold(d)
        seconds, loaded = timed(lambda: torch.load(d / "state.pt"))
        record("torch_load_cold", seconds)
        del loaded

    def raw(d: Path, step: int) -> None:
        record("raw_floor_save", timed(lambda: raw_floor(tensors, d / "raw.bin"))[0])

    def safetensors(d: Path, step: int) -> None:
        path = d / "state.safetensors"
        record("safetensors_save", timed(lambda: safetensors_save(tensors, path))[0])

    def dcp(d: Path, step: int) -> None:
        record("dcp_save", timed(lambda: dcp_save(tensors, d / "dcp"))[0])

    savers: list[tuple[str, Callable[[Path, int], None]]] = [
        ("raw", raw),
        ("torch", torch_pair),
        ("safetensors", safetensors),
        ("dcp", dcp),
        ("spotrun", spotrun),
    ]
    # One untimed write first: the first large write of a process here is several
    # times slower than the next ones, whatever writes it.
    with scratch(root, "warmup") as d:
        raw_floor(tensors, d / "r")
    buffers = {n: torch.empty_like(t) for n, t in tensors.items()}
    # A Checkpointer kept across runs: save_async's staging buffers are warm after the
    # first save, as in a training loop.
    with scratch(root, "async") as async_dir:
        async_ckpt = Checkpointer(LocalStore(async_dir), keep=1)
        async_ckpt.save_async(0, state).wait()
        for run in range(runs):
            log(f"run {run + 1}/{runs}")
            # rotate the order, so no method always runs after the same neighbour
            for label, fn in savers[run % len(savers) :] + savers[: run % len(savers)]:
                with scratch(root, label) as d:
                    fn(d, run + 1)
            # As in a training loop, the async save follows an optimizer step (which
            # changes the state in place), not the deletion of another saver's files.
            train_step()
            info = async_ckpt.save_async(run + 1, state).wait()
            record("spotrun_async_stall", info.stall_seconds)
            # the stall floor: one memcpy of every tensor into warm buffers
            record("staging_copy_floor", timed(lambda: copy_all(tensors, buffers))[0])
        async_ckpt.close()
    return times


def copy_all(tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    """One memcpy per tensor into warm buffers: the least any staging copy can cost."""
    for name, t in tensors.items():
        np.copyto(byte_view(buffers[name]), byte_view(t))


def bench_incremental(params: int, root: Path) -> dict[str, float]:
    """A fine-tune where only the last block trains (~5.7% of GPT-2-small's params)."""
    torch.manual_seed(1)
    model = build_model(params)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.blocks[-1].parameters():
        p.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train(model, optimizer, 1)
    with scratch(root, "incremental") as d, Checkpointer(LocalStore(d), keep=2) as ckpt:
        before = unique_tensors(training_state(model, optimizer, 1))
        before = {n: t.clone() for n, t in before.items()}
        ckpt.save(1, training_state(model, optimizer, 1))
        train(model, optimizer, 1, seed=1)
        after = unique_tensors(training_state(model, optimizer, 2))
        changed = sum(
            t.nbytes for n, t in after.items() if n not in before or not torch.equal(before[n], t)
        )
        seconds, info = timed(lambda: ckpt.save(2, training_state(model, optimizer, 2)))
    log(
        f"  incremental: {trainable / total:.1%} of params train, {changed / 1e6:.1f} MB of "
        f"{info.bytes_total / 1e6:.1f} MB changed, {info.bytes_written / 1e6:.1f} MB written "
        f"in {seconds:.3f} s"
    )
    return {
        "incremental_bytes_vs_changed": info.bytes_written / changed,
        "incremental_seconds": seconds,
        "trainable_fraction": trainable / total,
    }


def bench_s3(state: dict[str, Any], bf16_state: dict[str, Any]) -> dict[str, float]:
    """Bytes sent to an S3 mirror (moto, in-process) for fp32 and bf16 states."""
    import boto3
    from moto import mock_aws

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.setdefault(key, "testing")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    out: dict[str, float] = {}
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="bench")
        for label, s in (("fp32", state), ("bf16", bf16_state)):
            store = S3Store(f"s3://bench/{label}/", s3_client=client)
            with Checkpointer(store, keep=1) as ckpt:
                seconds, info = timed(lambda c=ckpt, s=s: c.save(1, s))
            sent = info.bytes_by_location["s3"]
            out[f"s3_bytes_vs_raw_{label}"] = sent / info.bytes_total
            out[f"s3_seconds_{label}"] = seconds
            log(
                f"  s3 {label}: {info.bytes_total / 1e6:.1f} MB raw -> {sent / 1e6:.1f} MB sent "
                f"({sent / info.bytes_total:.3f}) in {seconds:.2f} s (codec planes, moto)"
            )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=GPT2_SMALL, help="model size")
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (medians)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (a disk)")
    parser.add_argument(
        "--cold",
        choices=["auto", "drop_caches", "fadvise"],
        default="auto",
        help="how to empty the page cache before a cold read: drop_caches (the whole "
        "host's, needs root) or posix_fadvise(DONTNEED) on the files read; auto picks "
        "drop_caches when it works",
    )
    args = parser.parse_args(argv)
    global COLD_METHOD
    if args.cold == "drop_caches" or (args.cold == "auto" and _can_drop_caches()):
        COLD_METHOD = "drop_caches"
    root = args.dir or Path(tempfile.mkdtemp(prefix="spotrun-bench-"))
    root.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = build_model(args.params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train(model, optimizer, 3)
    state = training_state(model, optimizer, 3)
    nparams = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.nbytes for t in unique_tensors(state).values())
    log(
        f"model: {nparams / 1e6:.1f}M params, state {nbytes / 1e6:.1f} MB, dir {root}, "
        f"cold reads by {COLD_METHOD}, {os.cpu_count()} cores, torch {torch.__version__}"
    )

    times = bench_local(state, root, args.runs, lambda: train(model, optimizer, 1, seed=7))
    m = {name: median(values) for name, values in times.items()}
    incremental = bench_incremental(args.params, root)
    bf16_state = {"model": {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}}
    s3 = bench_s3(state, bf16_state)

    result: dict[str, Any] = {
        "durable_save_vs_raw_floor": m["spotrun_save"] / m["raw_floor_save"],
        "durable_save_vs_torch_save": m["spotrun_save"] / m["torch_save"],
        "stall_vs_torch_save": m["spotrun_async_stall"] / m["torch_save"],
        "stall_vs_copy_floor": m["spotrun_async_stall"] / m["staging_copy_floor"],
        "restore_vs_torch_load": m["spotrun_restore_into_cold"] / m["torch_load_cold"],
        "restore_alloc_vs_torch_load": m["spotrun_restore_alloc_cold"] / m["torch_load_cold"],
        "incremental_bytes_vs_changed": incremental["incremental_bytes_vs_changed"],
        "s3_bytes_vs_raw_fp32": s3["s3_bytes_vs_raw_fp32"],
        "s3_bytes_vs_raw_bf16": s3["s3_bytes_vs_raw_bf16"],
    }
    result = {k: round(v, 4) for k, v in result.items()}
    result["targets"] = TARGETS
    result["met"] = all(result[k] <= TARGETS[k] for k in TARGETS)
    result["seconds_median"] = {k: round(v, 4) for k, v in m.items()}
    result["details"] = {
        "params": nparams,
        "state_bytes": nbytes,
        "runs": args.runs,
        "cold_cache": COLD_METHOD,
        "s3": "S3Store against moto in-process; bytes = stored chunk + manifest bytes sent",
        "trainable_fraction": round(incremental["trainable_fraction"], 4),
        "incremental_seconds": round(incremental["incremental_seconds"], 4),
        **{k: round(v, 3) for k, v in s3.items() if k.startswith("s3_seconds")},
    }
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
