"""Session API: save/restore, rebalance, stop notice, user errors, the runner."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
import time

import boto3
import pytest
import torch

from spotrun_trainer.errors import EXIT_INTERRUPTED, Interrupted
from spotrun_trainer.interval import EveryNSteps
from spotrun_trainer.session import Session
from spotrun_trainer.ticket import Ticket
from spotrun_trainer.watcher import InterruptionWatcher, Notice


def _lines(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    loss = model(torch.randn(8, 4)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _session(tmp_path, **kwargs) -> Session:
    return Session(
        Ticket.standalone(tmp_path / "ckpt"),
        watcher=InterruptionWatcher(None),
        policy=EveryNSteps(100),
        **kwargs,
    )


def test_session_standalone_saves_restores_and_completes(tmp_path, capsys):
    # GIVEN a standalone session that trains 3 steps and commits step 3
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.Adam(model.parameters())
    with _session(tmp_path) as session:
        assert session.restore(model=model, optimizer=optimizer) == 0
        for _ in range(3):
            _train(model, optimizer)
        session.save(3, block=True)
        expected_rng = torch.get_rng_state()
        uri = session.complete(3, model, {"loss": 1.0})
    assert torch.equal(torch.load(uri, weights_only=True)["weight"], model.weight)

    # WHEN a new session restores into fresh objects
    torch.manual_seed(123)
    fresh = torch.nn.Linear(4, 2)
    fresh_optimizer = torch.optim.Adam(fresh.parameters())
    with _session(tmp_path) as session:
        step = session.restore(model=fresh, optimizer=fresh_optimizer)
        session.complete(step, fresh)

    # THEN everything is back, RNG included, and the lines follow the contract
    assert step == 3
    assert torch.equal(fresh.weight, model.weight)
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 3
    assert torch.equal(torch.get_rng_state(), expected_rng)
    events = [line["event"] for line in _lines(capsys)]
    assert events == ["start", "checkpoint", "report", "done", "start", "report", "done"]


def test_session_rebalance_asks_for_one_checkpoint(tmp_path):
    model = torch.nn.Linear(4, 2)
    with _session(tmp_path) as session:
        session.restore(model=model)
        assert not session.should_checkpoint(1)
        # WHEN a rebalance recommendation arrives
        session.watcher.deliver(Notice("rebalance", time.time()))
        # THEN the next step checkpoints once, and training goes on
        assert session.should_checkpoint(2)
        session.save(2).wait()
        assert not session.should_checkpoint(3)
        assert not session.interrupted
        session.complete(3, model)


def test_session_stop_notice_saves_synchronously_and_exits_75(tmp_path, capsys):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(Interrupted) as raised, _session(tmp_path) as session:
        session.restore(model=model, optimizer=optimizer)
        for step in range(1, 10):
            if step == 5:  # the notice comes during step 5, step 4's save in flight
                session.watcher.deliver(Notice("instance-action", time.time()))
            _train(model, optimizer)
            if step == 4 or session.should_checkpoint(step):
                session.save(step)
    assert raised.value.code == EXIT_INTERRUPTED
    lines = _lines(capsys)
    report = next(line for line in lines if line["event"] == "report")
    # step 4 committed (the in-flight save), then step 5 written synchronously
    assert [line["step"] for line in lines if line["event"] == "checkpoint"] == [4, 5]
    assert report == {
        "event": "report",
        "outcome": "Spot.Interrupted",
        "checkpoint_step": 5,
        "time_to_safe_seconds": report["time_to_safe_seconds"],
    }
    notice = next(line for line in lines if line["event"] == "notice")
    assert notice["kind"] == "instance-action"


FAILING_SCRIPT = textwrap.dedent(
    """
    import torch
    from spotrun_trainer import Session
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Session.from_env() as session:
        step = session.restore(model=model, optimizer=optimizer)
        while True:
            optimizer.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            optimizer.step()
            step += 1
            if step == 5:
                raise ValueError(f"boom at step {step}")
            if session.should_checkpoint(step):
                session.save(step)
    """
)


def test_session_user_error_reports_trainer_failed_with_the_committed_step(
    tmp_path, sfn_tasks, trainer_env, make_ticket
):
    # GIVEN a script that checkpoints every 2 steps and raises at step 5
    task = sfn_tasks.start()
    ticket = make_ticket(
        task_token=task.token,
        checkpoint_dir=str(tmp_path / "ckpt"),
        model_uri=str(tmp_path / "model.pt"),
        command=[sys.executable, "-c", FAILING_SCRIPT],
        interval={"steps": 2},
    )
    (tmp_path / "ticket.json").write_text(json.dumps(ticket))
    # WHEN it runs under the runner
    result = subprocess.run(
        [sys.executable, "-m", "spotrun_trainer", "run", "--ticket", str(tmp_path / "ticket.json")],
        env=trainer_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # THEN it exits non-zero, and Trainer.Failed carries the error and step 4, once
    assert result.returncode == 1, result.stderr
    reports = [json.loads(x) for x in result.stdout.splitlines() if '"report"' in x]
    assert [r["outcome"] for r in reports] == ["Trainer.Failed"]
    execution = task.result()
    assert execution["error"] == "Trainer.Failed"
    cause = json.loads(execution["cause"])
    assert cause["checkpoint_step"] == 4
    assert "ValueError: boom at step 5" in cause["error"]


def test_session_stop_notice_with_an_s3_mirror_commits_the_volume_first(
    tmp_path, moto_server, capsys
):
    # GIVEN a ticket whose checkpoints are mirrored to S3, and step 2 saved on both
    s3 = boto3.client("s3", region_name="us-east-1", endpoint_url=moto_server)
    s3.create_bucket(Bucket="mirror")
    base = Ticket.standalone(tmp_path / "ckpt")
    ticket = dataclasses.replace(
        base, checkpoint=dataclasses.replace(base.checkpoint, s3_uri="s3://mirror/checkpoints/j/")
    )
    session = Session(
        ticket, watcher=InterruptionWatcher(None), policy=EveryNSteps(100), s3_client=s3
    )
    model = torch.nn.Linear(4, 2)
    # WHEN a stop notice comes at step 3
    with pytest.raises(Interrupted), session:
        session.restore(model=model)
        session.save(2, block=True)
        session.watcher.deliver(Notice("sigterm", time.time()))
        if session.should_checkpoint(3):
            session.save(3)
    # THEN step 3 is committed on the volume without waiting for S3 (the control plane
    # snapshots the volume), S3 keeps step 2, and the report names the volume
    pointer = json.loads(s3.get_object(Bucket="mirror", Key="checkpoints/j/LATEST")["Body"].read())
    assert pointer["step"] == 2
    lines = _lines(capsys)
    saved = [(x["step"], x["location"]) for x in lines if x["event"] == "checkpoint"]
    assert saved == [(2, "s3"), (3, "volume")]
    report = next(x for x in lines if x["event"] == "report")
    assert report["checkpoint_step"] == 3


def test_session_loop_that_stops_on_interrupted_still_reports(tmp_path, capsys):
    # GIVEN a loop that breaks on session.interrupted without calling save()
    model = torch.nn.Linear(4, 2)
    with pytest.raises(Interrupted), _session(tmp_path) as session:
        session.restore(model=model)
        session.save(2, block=True)
        session.watcher.deliver(Notice("sigterm", time.time()))
        assert session.interrupted
    # THEN the newest committed step is reported
    report = next(x for x in _lines(capsys) if x["event"] == "report")
    assert report["outcome"] == "Spot.Interrupted" and report["checkpoint_step"] == 2


def test_session_script_that_forgets_complete_is_a_failure(tmp_path, capsys):
    with pytest.raises(Exception, match="without complete"), _session(tmp_path) as session:
        session.restore(model=torch.nn.Linear(4, 2))
    report = next(x for x in _lines(capsys) if x["event"] == "report")
    assert report["outcome"] == "Trainer.Failed"


@pytest.mark.parametrize(("told", "expected"), [(1, 1), (None, 3)])
def test_session_auto_interval_counts_the_interruptions_the_ticket_names(tmp_path, told, expected):
    # GIVEN a fourth attempt whose earlier ones were one spot interruption and two
    # restarts after Trainer.Failed (or a ticket that does not say)
    base = Ticket.standalone(tmp_path / "ckpt")
    ticket = dataclasses.replace(
        base,
        attempt=4,
        checkpoint=dataclasses.replace(base.checkpoint, interruptions_seen=told),
    )
    session = Session(ticket, watcher=InterruptionWatcher(None))
    # THEN Young/Daly estimates the time between interruptions from the interruptions
    # only; without the count it falls back to every earlier attempt
    assert session.policy.interruptions_seen == expected
    session.checkpointer.close()
