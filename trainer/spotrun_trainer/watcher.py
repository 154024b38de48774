"""Interruption watcher: IMDS spot notices, rebalance recommendations and SIGTERM.

Two kinds of signal, two meanings:

* ``instance-action`` (the two-minute spot warning) and ``sigterm``: save now and
  stop. They set :attr:`InterruptionWatcher.stop_requested`.
* ``rebalance``: an early warning that the instance is at elevated risk. Training
  goes on; the session takes one checkpoint soon (:meth:`take_rebalance`).

The polling thread never dies on an IMDS error: it logs the error (once per
change of error, so an absent IMDS does not flood the log) and polls again.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from spotrun_trainer.events import emit
from spotrun_trainer.imds import IMDSClient, IMDSError

log = logging.getLogger(__name__)

INSTANCE_ACTION_PATH = "meta-data/spot/instance-action"
REBALANCE_PATH = "meta-data/events/recommendations/rebalance"


@dataclass(frozen=True)
class Notice:
    """A notice as the trainer saw it; ``t`` is when it was seen (Unix seconds)."""

    kind: str  # "instance-action" | "rebalance" | "sigterm"
    t: float
    detail: dict[str, Any] = field(default_factory=dict)


class InterruptionWatcher:
    """Polls IMDS on a thread and listens for SIGTERM; the session asks it each step."""

    def __init__(self, imds: IMDSClient | None, poll_seconds: float = 2.0) -> None:
        self._imds = imds
        self.poll_seconds = poll_seconds
        self.stop_requested = threading.Event()
        # Re-entrant: the SIGTERM handler runs on the main thread, possibly while
        # that thread already holds the lock in take_rebalance().
        self._lock = threading.RLock()
        self._notice: Notice | None = None
        self._rebalance: Notice | None = None
        self._rebalance_pending = False
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_sigterm: Any = None
        self._last_error: str | None = None
        self.polls = 0

    @property
    def notice(self) -> Notice | None:
        """The notice that asks the trainer to stop, once one came."""
        return self._notice

    @property
    def rebalance(self) -> Notice | None:
        """The rebalance recommendation, once one came."""
        return self._rebalance

    def take_rebalance(self) -> bool:
        """True exactly once after a rebalance recommendation arrived."""
        with self._lock:
            pending, self._rebalance_pending = self._rebalance_pending, False
            return pending

    def start(self, handle_sigterm: bool = True) -> InterruptionWatcher:
        """Start polling (when there is an IMDS) and, on the main thread, catch SIGTERM."""
        if handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self._imds is not None and self._thread is None:
            self._thread = threading.Thread(
                target=self._poll_loop, name="spotrun-watcher", daemon=True
            )
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop polling and give SIGTERM back to whoever had it."""
        self._closing.set()
        if self._thread is not None:
            # Bounded: a poll stuck on an unresponsive IMDS must not delay the exit
            # (the thread is a daemon and ends by itself).
            self._thread.join(timeout=min(self.poll_seconds + 1, 3))
            self._thread = None
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def poll_once(self) -> None:
        """One round of IMDS reads; errors are logged, never raised."""
        assert self._imds is not None
        self.polls += 1
        try:
            action = self._imds.get(INSTANCE_ACTION_PATH)
            if action is not None:
                self.deliver(Notice("instance-action", time.time(), _parse(action)))
            if self._rebalance is None:
                rebalance = self._imds.get(REBALANCE_PATH)
                if rebalance is not None:
                    self.deliver(Notice("rebalance", time.time(), _parse(rebalance)))
        except IMDSError as error:
            message = str(error)
            if message != self._last_error:
                log.warning("IMDS poll failed (will keep polling): %s", message)
            self._last_error = message
            return
        if self._last_error is not None:
            log.info("IMDS reachable again")
            self._last_error = None

    def _poll_loop(self) -> None:
        while not self._closing.is_set():
            self.poll_once()
            if self.stop_requested.is_set():
                return  # nothing more to learn: the trainer is stopping
            self._closing.wait(self.poll_seconds)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set flags here: the save happens on the training thread at the next
        # step boundary, where the state is consistent.
        self.deliver(Notice("sigterm", time.time()))

    def deliver(self, notice: Notice) -> None:
        """Record a notice: from the IMDS poller, the SIGTERM handler, or a test."""
        with self._lock:
            if notice.kind == "rebalance":
                if self._rebalance is not None:
                    return
                self._rebalance = notice
                self._rebalance_pending = True
            else:
                if self._notice is not None:
                    return
                self._notice = notice
        if notice.kind != "rebalance":
            self.stop_requested.set()
        emit("notice", kind=notice.kind, t=notice.t)
        log.warning("interruption notice: %s %s", notice.kind, notice.detail)


def _parse(body: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return {"body": body}
    return value if isinstance(value, dict) else {"body": value}
