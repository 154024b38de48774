"""Command line: ``python -m spotrun_trainer run --ticket F`` and ``report-failure``.

``run`` is the container's entrypoint. It starts the ticket's command with the
ticket's environment and ``SPOTRUN_TICKET`` set, passes its output through,
forwards SIGTERM/SIGINT to it, and exits with its status. The command reports its
own outcome through the session; when it dies without having reported (an import
error, an OOM kill, a script that never used the session), ``run`` reports
``Trainer.Failed`` for it, so the state machine does not wait for a heartbeat
timeout. The command's report is recognised by its ``report`` line on stdout.

Torch is never imported here: this module also runs on hosts without it.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from spotrun_trainer.errors import TRAINER_FAILED, ReportError, TicketError
from spotrun_trainer.reporter import ControlReporter
from spotrun_trainer.ticket import TICKET_ENV, Ticket, load_ticket

log = logging.getLogger("spotrun_trainer")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("SPOTRUN_LOG_LEVEL", "INFO"),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    parser = argparse.ArgumentParser(prog="python -m spotrun_trainer")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the ticket's trainer command")
    run.add_argument("--ticket", default=os.environ.get(TICKET_ENV))
    failure = commands.add_parser("report-failure", help="report Trainer.Failed for a ticket")
    failure.add_argument("--ticket", default=os.environ.get(TICKET_ENV))
    failure.add_argument("--error", required=True)
    args = parser.parse_args(argv)
    if not args.ticket:
        parser.error(f"--ticket (or ${TICKET_ENV}) is required")
    if args.command == "run":
        return run_ticket(args.ticket)
    return report_failure(args.ticket, args.error)


def run_ticket(path: str) -> int:
    """Run the ticket's command; returns its exit status."""
    try:
        ticket = load_ticket(path)
    except TicketError as error:
        log.error("%s", error)
        _report_with_raw_token(path, str(error))
        return 2
    env = {**os.environ, **ticket.environment, TICKET_ENV: str(Path(path).resolve())}
    command = list(ticket.command)
    if command[0] in ("python", "python3"):
        # "python" in a ticket means the interpreter that has spotrun_trainer: the
        # same one in the image, and the right one in a venv (the local cloud).
        command[0] = sys.executable
    log.info("starting %s (job %s, attempt %d)", command, ticket.job_id, ticket.attempt)
    try:
        child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as error:
        _report(ticket, f"cannot start {command}: {error}")
        return 127
    forward = _forward_signals(child)
    stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
    copier = threading.Thread(target=_copy_stderr, args=(child, stderr_tail), daemon=True)
    copier.start()
    reported = False
    assert child.stdout is not None
    for raw in child.stdout:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        reported = reported or _is_report(raw)
    status = child.wait()
    copier.join(timeout=5)
    for signum, previous in forward.items():
        signal.signal(signum, previous)
    if not reported:
        reason = (
            f"trainer command exited with status {status} without reporting an outcome"
            if status != 0
            else "trainer command exited 0 without reporting an outcome "
            "(use spotrun_trainer.Session and complete())"
        )
        tail = "".join(stderr_tail).strip()
        _report(ticket, f"{reason}\n{tail}" if tail else reason)
        if status == 0:
            return 1
    return status if status >= 0 else 128 - status


def report_failure(path: str, error: str) -> int:
    """Report ``Trainer.Failed`` for the ticket at ``path``."""
    try:
        ticket = load_ticket(path)
    except TicketError as ticket_error:
        log.error("%s", ticket_error)
        return 0 if _report_with_raw_token(path, error) else 1
    return 0 if _report(ticket, error) else 1


def _report(ticket: Ticket, error: str) -> bool:
    reporter = ControlReporter(ticket.task_token, region=ticket.region)
    try:
        reporter.failed(error, _committed_step(ticket.checkpoint.dir))
    except ReportError as report_error:
        log.error("could not report %s: %s", TRAINER_FAILED, report_error)
        return False
    log.error("reported %s: %s", TRAINER_FAILED, error.splitlines()[0] if error else "")
    return True


def _report_with_raw_token(path: str, error: str) -> bool:
    """Report for a ticket that failed validation, when it still carries a token."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        token, region = raw.get("task_token"), raw.get("region")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(token, str) or not token:
        return False
    reporter = ControlReporter(token, region=region if isinstance(region, str) else None)
    try:
        return reporter.failed(f"invalid ticket: {error}", None) or True
    except ReportError as report_error:
        log.error("could not report %s: %s", TRAINER_FAILED, report_error)
        return False


def _committed_step(checkpoint_dir: str) -> int | None:
    """The step of the store's LATEST pointer, read without the checkpoint library."""
    try:
        pointer = json.loads((Path(checkpoint_dir) / "LATEST").read_text(encoding="utf-8"))
        return int(pointer["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_report(raw: bytes) -> bool:
    if b'"report"' not in raw:
        return False
    try:
        line: Any = json.loads(raw)
    except ValueError:
        return False
    return isinstance(line, dict) and line.get("event") == "report"


def _copy_stderr(child: subprocess.Popen[bytes], tail: collections.deque[str]) -> None:
    assert child.stderr is not None
    for raw in child.stderr:
        sys.stderr.buffer.write(raw)
        sys.stderr.flush()
        tail.append(raw.decode("utf-8", "replace"))


def _forward_signals(child: subprocess.Popen[bytes]) -> dict[int, Any]:
    """Pass SIGTERM/SIGINT on: the command saves and reports, then we exit with it."""

    def forward(signum: int, frame: Any) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    return {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}


if __name__ == "__main__":
    sys.exit(main())
