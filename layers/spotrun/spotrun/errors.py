"""Domain errors, named exactly as the state machine's Retry/Catch clauses name them.

Lambda's Python runtime reports ``type(exc).__name__`` as the ``errorType`` of an
unhandled exception, and Step Functions uses that ``errorType`` as the error name.
Python class names cannot contain a dot, but ``type()`` accepts any string as a
name, so each error below is built with the dotted name the ASL expects.
"""

from __future__ import annotations


class SpotrunError(Exception):
    """Base of every error spotrun raises on purpose."""


def _named(name: str, doc: str) -> type[SpotrunError]:
    return type(name, (SpotrunError,), {"__doc__": doc, "__module__": __name__})


CapacityUnavailable = _named(
    "Capacity.Unavailable", "No pool could grant an instance for this attempt."
)
SpotInterrupted = _named(
    "Spot.Interrupted", "The instance was reclaimed; the cause names the committed step."
)
InstanceLost = _named(
    "Instance.Lost", "The instance vanished without the trainer reporting an outcome."
)
TrainerFailed = _named("Trainer.Failed", "The training program failed for a reason of its own.")
JobInvalid = _named("Job.Invalid", "The job spec or record cannot be acted on.")

ERROR_NAMES = tuple(
    cls.__name__
    for cls in (CapacityUnavailable, SpotInterrupted, InstanceLost, TrainerFailed, JobInvalid)
)


class SpecError(JobInvalid):
    """A job spec failed validation; ``errors`` names each bad field and why.

    Each entry is ``{"field": "checkpoint.keep", "reason": "..."}``; ``"$"`` is the
    body as a whole (not JSON, too large, not an object). A subclass of
    ``Job.Invalid`` so code that catches the state machine's name catches it too.
    """

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{e['field']}: {e['reason']}" for e in self.errors))


class JobNotFoundError(SpotrunError):
    """No job record has this job id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found")


class JobConflictError(SpotrunError):
    """A conditional write on a job record failed: the record is not in the expected state."""

    def __init__(self, job_id: str, message: str, *, status: str | None = None) -> None:
        self.job_id = job_id
        self.status = status
        super().__init__(f"job {job_id}: {message}")
