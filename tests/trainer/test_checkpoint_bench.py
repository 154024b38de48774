"""Smoke test of bench/checkpoint.py: it runs end to end on a tiny model and reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_checkpoint_bench_smoke_prints_the_ratios(tmp_path):
    # GIVEN a tiny model WHEN the benchmark runs once
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "checkpoint.py"),
            "--params",
            "200000",
            "--runs",
            "1",
            "--cold",
            "fadvise",  # a test must not empty the whole host's page cache
            "--dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "trainer")},
        timeout=240,
        check=True,
    )
    # THEN its last line is one JSON object with every ratio and its target
    result = json.loads(done.stdout.strip().splitlines()[-1])
    keys = {
        "durable_save_vs_raw_floor",
        "durable_save_vs_torch_save",
        "stall_vs_torch_save",
        "restore_vs_torch_load",
        "incremental_bytes_vs_changed",
        "s3_bytes_vs_raw_fp32",
        "s3_bytes_vs_raw_bf16",
    }
    assert keys <= set(result) and set(result["targets"]) == keys
    assert all(isinstance(result[k], float) and result[k] > 0 for k in keys)
