"""StopExecution and SendTaskFailure as Step Functions does them, where moto does not.

On AWS, ``StopExecution`` ends an execution ABORTED at once, also one that waits
in a ``.waitForTaskToken`` task. moto's interpreter (a port of LocalStack's) sets
the stop flag but leaves the task's callback and heartbeat waits blocked: the
execution stays RUNNING until the heartbeat (or task) timeout fires, and that
timeout then overwrites the stop, so the execution ends FAILED with
``States.Timeout`` — and a cancelled job looks failed. While installed, a stop
also wakes the execution's waits, and a stopped execution keeps ABORTED.

moto 5.2.5's ``SendTaskFailure`` handler passes on ``error`` but drops ``cause``
(``moto/stepfunctions/responses.py`` reads only ``taskToken`` and ``error``). The
cause carries the trainer's committed checkpoint step (docs/contracts.md), which
the state machine records and which says which snapshot is newest, so
:class:`TaskFailureCauseFix` passes it on.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class StopExecutionFix:
    """Patches moto's parser ``Execution.stop`` for the lifetime of one local cloud."""

    def install(self) -> StopExecutionFix:
        from moto.stepfunctions.parser.backend.execution import Execution

        self._execution_class = Execution
        self._original_stop = Execution.stop
        original = self._original_stop

        def stop(execution: Any, stop_date: Any, error: str | None, cause: str | None) -> None:
            original(execution, stop_date, error, cause)
            environment = getattr(execution.exec_worker, "env", None)
            if environment is not None:
                _stay_stopped(environment)
                _wake_waiting_tasks(environment)

        Execution.stop = stop
        return self

    def uninstall(self) -> None:
        self._execution_class.stop = self._original_stop


def _stay_stopped(environment: Any) -> None:
    """Make a later error or timeout of the unwinding program leave the stop in place."""
    from moto.stepfunctions.parser.asl.eval.program_state import ProgramStopped

    for name in ("set_error", "set_timed_out"):
        original = getattr(environment, name)

        def guarded(*args: Any, _original: Any = original, **kwargs: Any) -> None:
            if isinstance(environment._program_state, ProgramStopped):
                environment.program_state_event.set()
                environment.program_state_event.clear()
                return
            _original(*args, **kwargs)

        setattr(environment, name, guarded)


def _wake_waiting_tasks(environment: Any) -> None:
    pool = environment.callback_pool_manager._pool
    for endpoint in list(pool.values()):
        endpoint.interrupt_all()
    log.debug("stopped execution: woke %d waiting task(s)", len(pool))


class TaskFailureCauseFix:
    """Patches moto's ``SendTaskFailure`` response handler to pass the cause on."""

    def install(self) -> TaskFailureCauseFix:
        from moto.core.responses import EmptyResult
        from moto.stepfunctions.responses import StepFunctionResponse

        self._response_class = StepFunctionResponse
        self._original = StepFunctionResponse.send_task_failure

        def send_task_failure(response: Any) -> Any:
            response.stepfunction_backend.send_task_failure(
                response._get_param("taskToken"),
                error=response._get_param("error"),
                cause=response._get_param("cause"),
            )
            return EmptyResult()

        StepFunctionResponse.send_task_failure = send_task_failure
        return self

    def uninstall(self) -> None:
        self._response_class.send_task_failure = self._original
