"""The session API a training script uses to survive spot interruptions.

Usage::

    with spotrun_trainer.Session.from_env() as session:
        start = session.restore(model=model, optimizer=optimizer, scheduler=scheduler,
                                scaler=scaler, data=sampler)
        for step in range(start + 1, total_steps + 1):
            loss = train_one_step(...)
            session.log_step(step, loss=loss)
            if session.should_checkpoint(step):
                session.save(step)      # async; on a notice: save, report, exit 75
        session.complete(total_steps, model, {"loss": loss})

A step number counts optimizer steps done: ``save(step)`` after step ``step`` and
``restore()`` returns it, so the loop continues with ``step + 1``.

Order on an interruption notice (``instance-action`` or SIGTERM), at the next
``should_checkpoint``/``save``: wait for the in-flight save to commit, write the
current step synchronously (volume, and S3 when the ticket has a mirror), report
``Spot.Interrupted`` with the committed step and the seconds from notice to safe,
then raise :class:`~spotrun_trainer.errors.Interrupted` (exit status 75).
An exception escaping the ``with`` block reports ``Trainer.Failed`` with the error
and the last committed step, and propagates (non-zero exit).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from spotrun_trainer import rng
from spotrun_trainer.checkpoint import Checkpointer, LocalStore, S3Store
from spotrun_trainer.errors import (
    SPOT_INTERRUPTED,
    TRAINER_FAILED,
    Interrupted,
    ReportError,
    SpotrunTrainerError,
)
from spotrun_trainer.events import emit
from spotrun_trainer.imds import ENDPOINT_ENV, IMDSClient
from spotrun_trainer.interval import IntervalPolicy, SaveCost, make_policy
from spotrun_trainer.output import write_model
from spotrun_trainer.reporter import SUCCEEDED, ControlReporter
from spotrun_trainer.ticket import Ticket, ticket_from_env
from spotrun_trainer.watcher import InterruptionWatcher

log = logging.getLogger(__name__)

POLL_ENV = "SPOTRUN_NOTICE_POLL_SECONDS"
LOG_EVERY_ENV = "SPOTRUN_LOG_EVERY"
STANDALONE_DIR_ENV = "SPOTRUN_CHECKPOINT_DIR"


class Stateful(Protocol):
    def state_dict(self) -> Mapping[str, Any]: ...
    def load_state_dict(self, state: Mapping[str, Any], /) -> Any: ...


class Session:
    """One attempt of a training job, as seen from the training script."""

    def __init__(
        self,
        ticket: Ticket,
        *,
        checkpointer: Checkpointer | None = None,
        reporter: ControlReporter | None = None,
        watcher: InterruptionWatcher | None = None,
        policy: IntervalPolicy | None = None,
        s3_client: Any = None,
        log_every: int | None = None,
    ) -> None:
        self.ticket = ticket
        self._s3_client = s3_client
        self.checkpointer = checkpointer or self._make_checkpointer()
        self.reporter = reporter or ControlReporter(
            ticket.task_token, region=ticket.region, heartbeat_seconds=ticket.heartbeat_seconds
        )
        self.watcher = watcher or self._make_watcher()
        self._policy = policy
        self.log_every = log_every or int(os.environ.get(LOG_EVERY_ENV, "10"))
        self._objects: dict[str, Stateful] = {}
        self._inflight: Any = None
        self._started_step: int | None = None
        self.committed_step: int | None = None
        self.committed_location: str | None = None
        self.resumed_from: int | None = None
        self._elapsed_before = 0.0
        self._attempt_started = time.monotonic()
        self._rebalance_due = False
        self._completed = False
        self._restored = False

    # -- construction ----------------------------------------------------------------

    @classmethod
    def from_env(cls, **kwargs: Any) -> Session:
        """The session for ``$SPOTRUN_TICKET``; without one, a standalone local run.

        Standalone: checkpoints in ``$SPOTRUN_CHECKPOINT_DIR`` (default
        ``./spotrun-checkpoints``), the model written next to them, nothing reported.
        """
        ticket = ticket_from_env()
        if ticket is None:
            ticket = Ticket.standalone(os.environ.get(STANDALONE_DIR_ENV, "spotrun-checkpoints"))
        return cls(ticket, **kwargs)

    @property
    def s3_client(self) -> Any:
        if self._s3_client is None:
            import boto3

            self._s3_client = boto3.client("s3", region_name=self.ticket.region)
        return self._s3_client

    def _make_checkpointer(self) -> Checkpointer:
        settings = self.ticket.checkpoint
        Path(settings.dir).mkdir(parents=True, exist_ok=True)
        mirror = S3Store(settings.s3_uri, s3_client=self.s3_client) if settings.s3_uri else None
        return Checkpointer(LocalStore(settings.dir), mirror=mirror, keep=settings.keep)

    def _make_watcher(self) -> InterruptionWatcher:
        poll = float(os.environ.get(POLL_ENV) or self.ticket.notice_poll_seconds)
        # A standalone run on a laptop has no IMDS: poll only when one is named or
        # the control plane launched us (there, IMDS is always there).
        has_imds = self.ticket.task_token is not None or bool(os.environ.get(ENDPOINT_ENV))
        return InterruptionWatcher(IMDSClient() if has_imds else None, poll_seconds=poll)

    @property
    def policy(self) -> IntervalPolicy:
        if self._policy is None:
            settings = self.ticket.checkpoint
            self._policy = make_policy(
                settings.interval,
                expected_interruption_seconds=settings.expected_interruption_seconds,
                interruptions_seen=(
                    settings.interruptions_seen
                    if settings.interruptions_seen is not None
                    else self.ticket.attempt - 1
                ),
                elapsed_seconds=self._elapsed_before,
            )
        return self._policy

    # -- context -------------------------------------------------------------------

    def __enter__(self) -> Session:
        self.watcher.start()
        self.reporter.start_heartbeat()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if isinstance(exc, Interrupted):
                return False
            if exc is not None and not _is_clean_exit(exc):
                self._report_failure(exc)
                return False
            if not self._completed:
                if self.interrupted:
                    # The loop ended on the notice without calling save(): report
                    # the newest committed step, which is all there is.
                    self._wait_inflight()
                    self._report_interrupted()
                    raise Interrupted(self.committed_step, self.watcher.notice.kind)  # type: ignore[union-attr]
                error = SpotrunTrainerError("the training script ended without complete()")
                self._report_failure(error)
                raise error
            return False
        finally:
            self.close()

    def close(self) -> None:
        """Stop heartbeats and the watcher, let the store finish; safe to call twice."""
        self.reporter.stop_heartbeat()
        self.watcher.close()
        try:
            self.checkpointer.close()
        except Exception:  # closing must not hide the outcome already reported
            log.exception("closing the checkpoint store failed")

    # -- restore -------------------------------------------------------------------

    def restore(self, **objects: Stateful) -> int:
        """Register the objects to checkpoint and load the newest checkpoint into them.

        Each object has ``state_dict()``/``load_state_dict()`` (model, optimizer,
        scheduler, grad scaler, :class:`~spotrun_trainer.data.ResumableSampler`, or
        your own). RNG states are restored too. Returns the step to continue after
        (0 when starting fresh).
        """
        for name, obj in objects.items():
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(f"{name}: needs state_dict() and load_state_dict()")
        self._objects = dict(objects)
        self._restored = True
        restored = None
        if self.ticket.resume_enabled:
            restored = self.checkpointer.restore()
        elif self.checkpointer.latest_step() is not None:
            log.warning("the ticket says not to resume; ignoring the checkpoints in the store")
        step = 0
        if restored is not None:
            self._load(restored.state)
            step = int(restored.step)
            self.resumed_from = step
            self.committed_step = step
            self.committed_location = _contract_location(restored.location)
            if self.ticket.resume_step is not None and step < self.ticket.resume_step:
                log.warning(
                    "resuming from step %d, older than step %d the control plane recorded",
                    step,
                    self.ticket.resume_step,
                )
        self._attempt_started = time.monotonic()
        self.policy.start(step)
        self._started_step = step
        emit("start", step=step, resumed_from=self.resumed_from)
        return step

    def _load(self, state: Mapping[str, Any]) -> None:
        saved = state["objects"]
        missing = sorted(set(self._objects) - set(saved))
        if missing:
            raise SpotrunTrainerError(f"the checkpoint has no state for {missing}")
        for name, obj in self._objects.items():
            obj.load_state_dict(saved[name])
        rng.restore(state["rng"])
        self._elapsed_before = float(state.get("meta", {}).get("elapsed_seconds", 0.0))

    # -- the training loop ---------------------------------------------------------

    @property
    def interrupted(self) -> bool:
        """True once a notice asks the trainer to stop (instance-action or SIGTERM)."""
        return self.watcher.stop_requested.is_set()

    def log_step(self, step: int, **metrics: Any) -> None:
        """Emit a ``step`` line every ``log_every`` steps."""
        if step % self.log_every == 0:
            emit("step", step=step, **metrics, t=time.time())

    def should_checkpoint(self, step: int) -> bool:
        """True when ``step`` should be saved: a notice, a rebalance, or the interval."""
        self._collect()
        if self.interrupted:
            return True
        if self.watcher.take_rebalance():
            self._rebalance_due = True
        if self._rebalance_due:
            return True
        if self._inflight is not None and self.policy.skip_while_busy:
            return False
        return self.policy.due(step)

    def save(self, step: int, *, block: bool = False) -> Any:
        """Checkpoint the registered objects as ``step``.

        Asynchronous by default: returns once the state is staged; the commit is
        reported later as a ``checkpoint`` line. After a stop notice it saves
        synchronously, reports ``Spot.Interrupted`` and raises ``Interrupted``.
        """
        if not self._restored:
            raise SpotrunTrainerError("call restore(...) before save()")
        if self.interrupted:
            self._save_on_notice(step)
        if step == self._started_step:
            return self._inflight  # this step is committed already, or being committed
        self._rebalance_due = False
        state = self._state(step)
        self._started_step = step
        self.policy.saved(step)
        if block:
            self._wait_inflight()
            info = self.checkpointer.save(step, state)
            self._committed(info)
            return info
        self._wait_inflight()
        self._inflight = self.checkpointer.save_async(step, state)
        return self._inflight

    def complete(
        self, final_step: int, model: Any, metrics: Mapping[str, Any] | None = None
    ) -> str:
        """Finish: commit ``final_step``, upload the model, report success.

        ``model`` is a file path, an ``nn.Module`` or a state dict. Returns the model
        URI. A notice that arrives now is ignored: finishing is the better use of
        the warning time.
        """
        metrics = dict(metrics or {})
        self._wait_inflight()
        if self._restored and self.committed_step != final_step:
            self._committed(self.checkpointer.save(final_step, self._state(final_step)))
        model_uri = write_model(
            model,
            self.ticket.model_uri,
            s3_client=self.s3_client if self.ticket.model_uri.startswith("s3://") else None,
        )
        try:
            self.reporter.succeed(final_step, model_uri, metrics, self.committed_step)
        except ReportError:
            log.exception("the success report could not be delivered")
            raise
        emit("report", outcome=SUCCEEDED, checkpoint_step=self.committed_step)
        emit("done", final_step=final_step, model_uri=model_uri)
        self._completed = True
        return model_uri

    # -- internals -----------------------------------------------------------------

    def _state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "objects": {name: obj.state_dict() for name, obj in self._objects.items()},
            "rng": rng.capture(),
            "meta": {
                "job_id": self.ticket.job_id,
                "attempt": self.ticket.attempt,
                "elapsed_seconds": self._elapsed_before
                + (time.monotonic() - self._attempt_started),
            },
        }

    def _collect(self) -> None:
        """Pick up an asynchronous save that has committed meanwhile."""
        if self._inflight is not None and self._inflight.done():
            self._wait_inflight()

    def _wait_inflight(self) -> Any:
        handle, self._inflight = self._inflight, None
        if handle is None:
            return None
        try:
            info = handle.wait()
        except Exception:
            log.exception("checkpoint of step %s failed; the previous one stands", handle.step)
            return None
        self._committed(info)
        return info

    def _committed(self, info: Any) -> None:
        self.committed_step = int(info.step)
        self.committed_location = _contract_location(info.location)
        if getattr(info, "mirror_error", None):
            log.warning("step %d is on the volume only: %s", info.step, info.mirror_error)
        self.policy.measured(SaveCost(float(info.stall_seconds), float(info.seconds)))
        emit(
            "checkpoint",
            step=int(info.step),
            seconds=round(float(info.seconds), 4),
            stall_seconds=round(float(info.stall_seconds), 4),
            durable=True,
            location=self.committed_location,
        )

    def _save_on_notice(self, step: int) -> None:
        # The volume commit is what the notice needs; an S3 upload in progress (of the
        # in-flight save) stops, and this step is not mirrored: the control plane
        # snapshots the volume, and restore prefers the newer volume checkpoint.
        self.checkpointer.hurry()
        self._wait_inflight()
        if self.committed_step != step:
            try:
                self._committed(self.checkpointer.save(step, self._state(step)))
            except Exception:
                # The job can still resume from the previous checkpoint: say so.
                log.exception("saving step %d on the notice failed", step)
        self._report_interrupted()
        raise Interrupted(self.committed_step, self.watcher.notice.kind)  # type: ignore[union-attr]

    def _report_interrupted(self) -> None:
        notice = self.watcher.notice
        assert notice is not None
        time_to_safe = max(0.0, time.time() - notice.t)
        location = self.committed_location or "volume"
        try:
            self.reporter.interrupted(self.committed_step, location, notice.kind, time_to_safe)
        except ReportError:
            log.exception("the interruption report could not be delivered")
        emit(
            "report",
            outcome=SPOT_INTERRUPTED,
            checkpoint_step=self.committed_step,
            time_to_safe_seconds=round(time_to_safe, 3),
        )

    def _report_failure(self, exc: BaseException) -> None:
        self._wait_inflight()
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        tail = "".join(traceback.format_tb(exc.__traceback__)[-3:]) if exc.__traceback__ else ""
        error = f"{text}\n{tail}".strip()
        try:
            self.reporter.failed(error, self.committed_step)
        except ReportError:
            log.exception("the failure report could not be delivered")
        emit("report", outcome=TRAINER_FAILED, checkpoint_step=self.committed_step, error=text)


def _contract_location(location: str) -> str:
    """The store's location in the contract's words: ``volume`` or ``s3``.

    A checkpoint on both counts as ``s3``: that copy survives a move to another AZ.
    """
    return "s3" if "s3" in location.split("+") else "volume"


def _is_clean_exit(exc: BaseException) -> bool:
    return isinstance(exc, SystemExit) and exc.code in (0, None)
