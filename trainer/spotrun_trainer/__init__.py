"""spotrun's in-instance runtime: session API, interruption watcher, control reporter.

The session (and with it torch) is imported on first use, so the runner and the
bootstrap helpers (``python -m spotrun_trainer run|report-failure``) start fast and
work where torch is not installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from spotrun_trainer.errors import EXIT_INTERRUPTED, Interrupted, TicketError
from spotrun_trainer.ticket import Ticket, load_ticket, ticket_from_env

if TYPE_CHECKING:
    from spotrun_trainer.data import ResumableSampler
    from spotrun_trainer.session import Session

__all__ = [
    "EXIT_INTERRUPTED",
    "Interrupted",
    "ResumableSampler",
    "Session",
    "Ticket",
    "TicketError",
    "load_ticket",
    "ticket_from_env",
]


def __getattr__(name: str) -> Any:
    if name == "Session":
        from spotrun_trainer.session import Session

        return Session
    if name == "ResumableSampler":
        from spotrun_trainer.data import ResumableSampler

        return ResumableSampler
    raise AttributeError(f"module 'spotrun_trainer' has no attribute {name!r}")
