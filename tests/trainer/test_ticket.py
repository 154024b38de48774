"""Ticket loading and validation: good tickets load, bad ones name the field."""

from __future__ import annotations

import copy
import json

import pytest

from spotrun_trainer.errors import TicketError
from spotrun_trainer.ticket import Interval, load_ticket, parse_ticket


@pytest.fixture
def document(make_ticket):
    ticket = make_ticket(
        task_token="tok",
        checkpoint_dir="/mnt/spotrun/checkpoint",
        model_uri="s3://b/models/j/model.pt",
        s3_uri="s3://b/checkpoints/j/",
        volumes=[
            {
                "role": "checkpoint",
                "volume_id": "vol-1",
                "device": "/dev/sdf",
                "mount_point": "/mnt/spotrun/checkpoint",
                "format_if_empty": True,
                "read_only": False,
            },
        ],
    )
    ticket["dataset"] = {"mount_point": "/mnt/spotrun/data"}
    return ticket


def test_ticket_loads_every_field(tmp_path, document):
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(document))
    ticket = load_ticket(path)
    assert ticket.job_id == "j-20261204-test01"
    assert ticket.task_token == "tok"
    assert ticket.volumes[0].volume_id == "vol-1" and ticket.volumes[0].format_if_empty
    assert ticket.dataset_dir == "/mnt/spotrun/data"
    assert ticket.checkpoint.interval == Interval("auto")
    assert ticket.checkpoint.s3_uri == "s3://b/checkpoints/j/"
    assert ticket.model_uri == "s3://b/models/j/model.pt"
    assert ticket.notice_poll_seconds == 0.05


@pytest.mark.parametrize(
    ("interval", "expected"),
    [("auto", Interval("auto")), ({"steps": 50}, Interval("steps", 50)),
     ({"seconds": 90}, Interval("seconds", 90.0))],
)  # fmt: skip
def test_ticket_interval_forms(document, interval, expected):
    document["checkpoint"]["interval"] = interval
    assert parse_ticket(document).checkpoint.interval == expected


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: t.pop("task_token"), "'task_token': missing"),
        (lambda t: t.update(attempt=0), "'attempt': must be >= 1"),
        (lambda t: t.update(command=[]), "'command'"),
        (lambda t: t["checkpoint"].update(interval={"steps": 0}), "'checkpoint.interval'"),
        (lambda t: t["checkpoint"].update(interval={"minutes": 5}), "'checkpoint.interval'"),
        (lambda t: t["checkpoint"].update(keep="3"), "'checkpoint.keep': must be an integer"),
        (lambda t: t["checkpoint"].update(s3_uri="b/p"), "'checkpoint.s3_uri': must be an s3://"),
        (lambda t: t["volumes"][0].pop("device"), "'volumes[0].device': missing"),
        (lambda t: t["volumes"][0].update(mount_point="mnt"), "'volumes[0].mount_point'"),
        (lambda t: t["resume"].update(enabled="yes"), "'resume.enabled': must be true or false"),
        (lambda t: t.update(heartbeat_seconds=0), "'heartbeat_seconds': must be > 0"),
        (lambda t: t.update(ticket_version=2), "'ticket_version'"),
        (lambda t: t.update(dataset={"path": "/x"}), "'dataset'"),
        (lambda t: t.update(environment={"A": 1}), "'environment'"),
        (lambda t: t.pop("output"), "'output': missing"),
    ],
)
def test_ticket_error_names_the_field(document, change, field):
    bad = copy.deepcopy(document)
    change(bad)
    with pytest.raises(TicketError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_ticket(bad)


def test_ticket_unreadable_file_is_a_ticket_error(tmp_path):
    with pytest.raises(TicketError, match="cannot read"):
        load_ticket(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(TicketError, match="not JSON"):
        load_ticket(tmp_path / "bad.json")
