"""Exceptions of the in-instance runtime, and the outcome names the control plane knows."""

from __future__ import annotations

# Error names the state machine catches (docs/contracts.md, "Errors"); the trainer
# never imports the control-plane layer, so the two strings are repeated here.
SPOT_INTERRUPTED = "Spot.Interrupted"
TRAINER_FAILED = "Trainer.Failed"

# Exit status of a trainer that saved on an interruption notice and reported it.
# 75 is EX_TEMPFAIL from sysexits.h: "try again later", which is what happened.
EXIT_INTERRUPTED = 75


class SpotrunTrainerError(Exception):
    """Base class of every error this package raises on purpose."""


class TicketError(SpotrunTrainerError):
    """The ticket is missing, unreadable or does not follow the contract."""


class ReportError(SpotrunTrainerError):
    """A report to the control plane could not be delivered after all retries."""


class Interrupted(SystemExit):
    """Raised by the session after it saved and reported on a notice.

    A ``SystemExit`` so that a user's ``except Exception`` does not swallow it and
    the interpreter exits with :data:`EXIT_INTERRUPTED` when nobody catches it.
    """

    def __init__(self, step: int | None, kind: str) -> None:
        super().__init__(EXIT_INTERRUPTED)
        self.step = step
        self.kind = kind
