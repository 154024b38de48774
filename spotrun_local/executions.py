"""Step Functions execution status changes as EventBridge events, as Step Functions emits them.

moto's interpreter emits no events, so this polls the stack's state machines
and, for each execution that starts or ends, sends a "Step Functions Execution
Status Change" event through the router (and so through the template's rules).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from spotrun_local.aws import MotoServer

log = logging.getLogger(__name__)

STATUS_CHANGE = "Step Functions Execution Status Change"


def _millis(value: datetime | None) -> int | None:
    return int(value.timestamp() * 1000) if value else None


@dataclass
class ExecutionWatcher:
    """Polls executions; announces RUNNING and every end (SUCCEEDED, FAILED, TIMED_OUT, ABORTED)."""

    aws: MotoServer
    state_machine_arns: Iterable[str]
    put_event: Callable[[str, str, dict, list[str]], None]
    poll_seconds: float = 0.5
    statuses: dict[str, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ExecutionWatcher:
        self._sfn = self.aws.client("stepfunctions")
        self._arns = list(self.state_machine_arns)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="executions")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as error:  # the server is going away at shutdown
                if not self._stop.is_set():
                    log.warning("execution poll failed: %s", error)

    def poll(self) -> None:
        for machine in self._arns:
            pages = self._sfn.get_paginator("list_executions").paginate(stateMachineArn=machine)
            for page in pages:
                for execution in page["executions"]:
                    arn, status = execution["executionArn"], execution["status"]
                    if self.statuses.get(arn) == status:
                        continue
                    self.statuses[arn] = status
                    self._announce(machine, arn)

    def _announce(self, machine: str, execution_arn: str) -> None:
        described = self._sfn.describe_execution(executionArn=execution_arn)
        detail = {
            "executionArn": execution_arn,
            "stateMachineArn": machine,
            "name": described["name"],
            "status": described["status"],
            "startDate": _millis(described.get("startDate")),
            "stopDate": _millis(described.get("stopDate")),
            "input": described.get("input"),
            "output": described.get("output"),
            "inputDetails": {"included": True},
            "outputDetails": {"included": True},
            "error": described.get("error"),
            "cause": described.get("cause"),
        }
        log.info("execution %s: %s", described["name"], described["status"])
        self.put_event("aws.states", STATUS_CHANGE, json.loads(json.dumps(detail)), [execution_arn])
