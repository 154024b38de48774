"""The command line: ``run`` (the container entrypoint) and ``report-failure``."""

from __future__ import annotations

import json
import subprocess
import sys

RUN = [sys.executable, "-m", "spotrun_trainer"]


def _write(tmp_path, ticket) -> str:
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(ticket))
    return str(path)


def test_runner_reports_an_invalid_ticket_when_it_has_a_token(
    tmp_path, sfn_tasks, trainer_env, make_ticket
):
    task = sfn_tasks.start()
    ticket = make_ticket(task_token=task.token, checkpoint_dir="/c", model_uri="/m")
    ticket["checkpoint"]["interval"] = "sometimes"
    result = subprocess.run(
        [*RUN, "run", "--ticket", _write(tmp_path, ticket)],
        env=trainer_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    execution = task.result()
    assert execution["error"] == "Trainer.Failed"
    assert "checkpoint.interval" in json.loads(execution["cause"])["error"]


def test_runner_passes_output_and_env_and_fails_a_silent_success(
    tmp_path, sfn_tasks, trainer_env, make_ticket
):
    # GIVEN a command that prints a line and exits 0 without ever reporting
    task = sfn_tasks.start()
    script = "import os; print(os.environ['FROM_TICKET'] + ' ' + os.environ['SPOTRUN_TICKET'])"
    ticket = make_ticket(
        task_token=task.token,
        checkpoint_dir=str(tmp_path / "ckpt"),
        model_uri="/m",
        command=["python", "-c", script],  # "python" is the runner's own interpreter
        environment={"FROM_TICKET": "hello"},
    )
    path = _write(tmp_path, ticket)
    result = subprocess.run(
        [*RUN, "run", "--ticket", path], env=trainer_env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    # THEN its output came through, and the task fails instead of hanging
    assert result.stdout.strip() == f"hello {path}"
    assert result.returncode == 1
    assert "without reporting" in json.loads(task.result()["cause"])["error"]


def test_report_failure_command_reports_trainer_failed(
    tmp_path, sfn_tasks, trainer_env, make_ticket
):
    task = sfn_tasks.start()
    ticket = make_ticket(task_token=task.token, checkpoint_dir=str(tmp_path), model_uri="/m")
    result = subprocess.run(
        [*RUN, "report-failure", "--ticket", _write(tmp_path, ticket), "--error", "disk full"],
        env=trainer_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    execution = task.result()
    assert execution["error"] == "Trainer.Failed"
    assert json.loads(execution["cause"]) == {"error": "disk full", "checkpoint_step": None}
