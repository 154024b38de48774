"""``make demo``'s engine: one job through interruptions, its summary and its plot."""

from __future__ import annotations

import io
import json

import pytest
from e2e_support import NOTICE_SECONDS

from spotrun_local.chaos import Fault
from spotrun_local.demo import (
    DemoOptions,
    parse_pool,
    parse_schedule,
    run_demo,
    spread_interruptions,
)

SUMMARY_FIELDS = {
    "status",
    "interruptions",
    "steps_lost",
    "time_to_safe_seconds",
    "recovery_seconds",
    "attempts",
    "leaked",
    "model_path",
    "wall_seconds",
}


def test_demo_parse_schedule_reads_every_kind_and_trigger():
    faults = parse_schedule("interrupt@step=60, kill@step=120,rebalance@t=20")
    assert [(f.kind, f.at_step, f.at_seconds) for f in faults] == [
        ("interrupt", 60, None),
        ("kill", 120, None),
        ("rebalance", None, 20.0),
    ]


@pytest.mark.parametrize(
    "text", ["interrupt@minute=3", "explode@step=3", "interrupt@step=soon", "interrupt"]
)
def test_demo_parse_schedule_rejects_bad_items(text):
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_demo_parse_pool_and_spread():
    fault = parse_pool("g5.xlarge@us-east-1b")
    assert (fault.instance_type, fault.availability_zone, fault.market) == (
        "g5.xlarge",
        "us-east-1b",
        "spot",
    )
    assert parse_pool("@us-east-1a").instance_type is None
    assert [f.at_step for f in spread_interruptions(3, 200)] == [50, 100, 150]


@pytest.mark.e2e
def test_demo_runs_a_job_through_interruptions_and_writes_summary_and_plot(tmp_path):
    # GIVEN a short demo with two interruptions at chosen steps
    options = DemoOptions(
        steps=60,
        notice_seconds=NOTICE_SECONDS,
        faults=[Fault(at_step=15), Fault(at_step=35)],
        out=tmp_path / "demo",
        timeout_seconds=240,
    )
    shown = io.StringIO()
    # WHEN it runs
    summary = run_demo(options, stream=shown)
    # THEN the job succeeded through both, and the summary on disk says so
    written = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert written == summary
    assert set(summary) >= SUMMARY_FIELDS
    assert summary["status"] == "SUCCEEDED", shown.getvalue()
    assert summary["interruptions"] == 2
    assert summary["attempts"] == 3
    assert all(seconds is not None and seconds > 0 for seconds in summary["time_to_safe_seconds"])
    assert all(seconds is not None and seconds > 0 for seconds in summary["recovery_seconds"])
    # a notice is saved at the step it reached: nothing to redo
    assert summary["steps_lost"] == [0, 0]
    assert summary["leaked"] == {"instances": [], "volumes": [], "processes": []}
    assert summary["final_step"] == 60
    with open(summary["model_path"], "rb") as model:
        assert model.read(2) == b"PK"  # torch.save's zip container
    assert (tmp_path / "demo" / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # and the live view told each interruption's time to safe and recovery
    assert shown.getvalue().count("safe in") == 2


@pytest.mark.e2e
def test_demo_that_runs_out_of_time_cancels_the_job_and_still_writes_its_summary(tmp_path):
    # GIVEN a demo whose job cannot finish within the demo's time limit
    options = DemoOptions(
        steps=2000,
        notice_seconds=NOTICE_SECONDS,
        faults=[],
        out=tmp_path / "demo",
        timeout_seconds=8,
    )
    # WHEN it runs out of time
    summary = run_demo(options, stream=io.StringIO())
    # THEN the job was cancelled, nothing of it is left, and the files are there
    assert summary["timed_out"] is True
    assert summary["status"] == "CANCELLED"
    assert summary["leaked"] == {"instances": [], "volumes": [], "processes": []}
    assert summary["model_path"] is None
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
    assert (tmp_path / "demo" / "timeline.png").exists()
