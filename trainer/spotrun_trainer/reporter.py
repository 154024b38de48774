"""Control reporter: heartbeats and the one outcome report, sent with the task token.

Outcomes (docs/contracts.md, "Trainer → control plane"):

* :meth:`ControlReporter.succeed` → ``SendTaskSuccess`` with the final step, model
  location, metrics and committed checkpoint step;
* :meth:`ControlReporter.interrupted` → ``SendTaskFailure`` ``Spot.Interrupted``;
* :meth:`ControlReporter.failed` → ``SendTaskFailure`` ``Trainer.Failed``.

Every call is retried with capped, jittered backoff on throttling and network
errors. Only the first outcome is sent; later ones are logged and dropped. When
Step Functions answers ``TaskTimedOut``, ``InvalidToken`` or ``TaskDoesNotExist``
the task is already closed (a repeat report, or the control plane gave up on us):
that is logged, not raised, because nothing the trainer could do would change it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from spotrun_trainer.errors import SPOT_INTERRUPTED, TRAINER_FAILED, ReportError

log = logging.getLogger(__name__)

SUCCEEDED = "Succeeded"

# The task is closed for good; retrying cannot help.
CLOSED_TASK_CODES = frozenset({"TaskTimedOut", "InvalidToken", "TaskDoesNotExist"})
RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalServerError",
        "InternalServiceError",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
# Step Functions limits (SendTaskFailure): error 256 characters, cause 32,768.
MAX_ERROR_CHARS = 256
MAX_CAUSE_CHARS = 32768


def make_stepfunctions_client(region: str | None = None) -> Any:
    """A Step Functions client; ``AWS_ENDPOINT_URL`` is honoured by boto3 itself.

    botocore's own retries are off: :class:`ControlReporter` retries, with a deadline
    that fits the two-minute spot warning, and the two would multiply.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=5,
        read_timeout=15,
    )
    return boto3.client("stepfunctions", region_name=region, config=config)


class ControlReporter:
    """Reports this attempt's liveness and outcome; inert without a task token."""

    def __init__(
        self,
        task_token: str | None,
        *,
        client: Any = None,
        region: str | None = None,
        heartbeat_seconds: float = 60.0,
        deadline_seconds: float = 90.0,
        base_delay_seconds: float = 0.5,
        max_delay_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.task_token = task_token
        self.heartbeat_seconds = heartbeat_seconds
        self.deadline_seconds = deadline_seconds
        self._base_delay = base_delay_seconds
        self._max_delay = max_delay_seconds
        self._sleep = sleep
        self._client = client
        self._region = region
        self._report_lock = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self.outcome: str | None = None
        self.task_closed = False
        self.heartbeats_sent = 0

    @property
    def enabled(self) -> bool:
        return bool(self.task_token)

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_stepfunctions_client(self._region)
        return self._client

    # -- heartbeats ----------------------------------------------------------------

    def start_heartbeat(self) -> None:
        """Send ``SendTaskHeartbeat`` now and then every ``heartbeat_seconds``."""
        if not self.enabled or self._heartbeat_thread is not None:
            return
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_loop, name="spotrun-heartbeat", daemon=True
        )
        self._heartbeat_thread.start()

    def stop_heartbeat(self) -> None:
        self._stopping.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=30)
            self._heartbeat_thread = None

    def heartbeat(self) -> bool:
        """One heartbeat; False when it could not be sent (logged)."""
        if not self.enabled or self.task_closed or self.outcome is not None:
            return False
        try:
            self._call(
                "send_task_heartbeat",
                {"taskToken": self.task_token},
                deadline=min(self.deadline_seconds, self.heartbeat_seconds),
            )
        except ReportError as error:
            log.warning("heartbeat not sent: %s", error)
            return False
        if self.task_closed:
            return False
        self.heartbeats_sent += 1
        return True

    def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            self.heartbeat()
            if self.task_closed:
                log.warning("task is closed; heartbeats stop")
                return
            self._stopping.wait(self.heartbeat_seconds)

    # -- outcomes ------------------------------------------------------------------

    def succeed(
        self,
        final_step: int,
        model_uri: str,
        metrics: Mapping[str, Any],
        checkpoint_step: int | None,
    ) -> bool:
        """Report success; True when this call delivered the outcome."""
        output = {
            "final_step": int(final_step),
            "model_uri": model_uri,
            "metrics": dict(metrics),
            "checkpoint_step": checkpoint_step,
        }
        return self._report(
            SUCCEEDED,
            "send_task_success",
            {"taskToken": self.task_token, "output": json.dumps(output, default=str)},
        )

    def interrupted(
        self,
        checkpoint_step: int | None,
        checkpoint_location: str,
        notice: str,
        time_to_safe_seconds: float,
    ) -> bool:
        """Report ``Spot.Interrupted`` with the committed step."""
        cause = {
            "checkpoint_step": checkpoint_step,
            "checkpoint_location": checkpoint_location,
            "notice": notice,
            "time_to_safe_seconds": round(float(time_to_safe_seconds), 3),
        }
        return self._fail(SPOT_INTERRUPTED, cause)

    def failed(self, error: str, checkpoint_step: int | None) -> bool:
        """Report ``Trainer.Failed`` with the error text."""
        return self._fail(TRAINER_FAILED, {"error": error, "checkpoint_step": checkpoint_step})

    def _fail(self, error: str, cause: Mapping[str, Any]) -> bool:
        text = json.dumps(dict(cause), default=str)
        if len(text) > MAX_CAUSE_CHARS and "error" in cause:
            # Keep the cause valid JSON: shorten the error message, not the document.
            excess = len(text) - MAX_CAUSE_CHARS + 20
            shortened = {**cause, "error": str(cause["error"])[:-excess] + "…"}
            text = json.dumps(shortened, default=str)
        return self._report(
            error,
            "send_task_failure",
            {"taskToken": self.task_token, "error": error[:MAX_ERROR_CHARS], "cause": text},
        )

    def _report(self, outcome: str, operation: str, params: dict[str, Any]) -> bool:
        with self._report_lock:
            if self.outcome is not None:
                log.info("outcome %s already reported; %s not sent", self.outcome, outcome)
                return False
            if not self.enabled:
                log.info("no task token: outcome %s not sent", outcome)
                self.outcome = outcome
                return False
            self._call(operation, params, deadline=self.deadline_seconds)
            self.outcome = outcome
            self._stopping.set()  # no heartbeats after the outcome
            return not self.task_closed

    # -- the one place that talks to Step Functions ---------------------------------

    def _call(self, operation: str, params: dict[str, Any], deadline: float) -> None:
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        give_up = time.monotonic() + deadline
        attempt = 0
        while True:
            attempt += 1
            try:
                getattr(self.client, operation)(**params)
                return
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                if code in CLOSED_TASK_CODES:
                    log.warning("%s: task already closed (%s); nothing to do", operation, code)
                    self.task_closed = True
                    return
                if code not in RETRYABLE_CODES:
                    raise ReportError(f"{operation} failed: {code}: {error}") from error
                failure: Exception = error
            except (BotoConnectionError, HTTPClientError) as error:
                # Connection refused/reset, timeouts: the network, not the request.
                failure = error
            delay = min(self._max_delay, self._base_delay * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)
            if time.monotonic() + delay > give_up:
                raise ReportError(
                    f"{operation} failed after {attempt} attempts: {failure}"
                ) from failure
            log.warning(
                "%s attempt %d failed (%s); retrying in %.1fs", operation, attempt, failure, delay
            )
            self._sleep(delay)
