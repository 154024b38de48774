"""Structural checks of statemachine/training_job.asl.json (what no linter checks for us).

Neither ``sam validate --lint`` nor cfn-lint looks inside the ASL of an
``AWS::Serverless::StateMachine`` (FINDINGS.md), so these do.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from spotrun.errors import ERROR_NAMES
from spotrun_local.template import (
    Resolver,
    load_template,
    state_machine_definition,
    unsubstituted_variables,
)

REPO = Path(__file__).resolve().parents[2]
ASL_PATH = REPO / "statemachine" / "training_job.asl.json"
TEMPLATE = load_template(REPO / "template.yaml")
DEFINITION: dict[str, Any] = json.loads(ASL_PATH.read_text())
STATES: dict[str, dict[str, Any]] = DEFINITION["States"]
LAMBDA_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
}


def targets(state: dict[str, Any]) -> list[str]:
    found = [state[key] for key in ("Next", "Default") if key in state]
    found += [choice["Next"] for choice in state.get("Choices", [])]
    found += [catcher["Next"] for catcher in state.get("Catch", [])]
    return found


def test_definition_every_target_exists() -> None:
    assert DEFINITION["StartAt"] in STATES
    for name, state in STATES.items():
        for target in targets(state):
            assert target in STATES, f"{name} -> {target}"


def test_definition_no_unreachable_state() -> None:
    reached, frontier = set(), [DEFINITION["StartAt"]]
    while frontier:
        name = frontier.pop()
        if name not in reached:
            reached.add(name)
            frontier.extend(targets(STATES[name]))
    assert reached == set(STATES)


def test_definition_every_non_terminal_state_continues() -> None:
    for name, state in STATES.items():
        if state["Type"] in ("Succeed", "Fail"):
            continue
        assert state.get("End") or targets(state), name
        if state["Type"] == "Choice":
            assert "Default" in state, f"{name}: a Choice without Default can fail the run"


def test_definition_every_task_has_retry_and_catch_all() -> None:
    for name, state in STATES.items():
        if state["Type"] != "Task":
            continue
        retried = {error for retrier in state.get("Retry", []) for error in retrier["ErrorEquals"]}
        assert retried & (LAMBDA_ERRORS | {"States.ALL"}), f"{name} retries no Lambda error"
        caught = [c for catcher in state.get("Catch", []) for c in catcher["ErrorEquals"]]
        assert "States.ALL" in caught, f"{name} lets an unexpected error end the run"


def test_definition_unexpected_failures_reach_the_cleanup_path() -> None:
    cleanup = {"Release After Failure", "Finalize Failed Job", "Job Failed"}
    for name, state in STATES.items():
        for catcher in state.get("Catch", []):
            if "States.ALL" in catcher["ErrorEquals"]:
                assert catcher["Next"] in cleanup, name


def test_definition_lambda_results_are_shaped() -> None:
    # moto's describe_execution breaks on datetimes in the output; the invoke
    # response has none once ResultSelector picks fields from the Payload.
    for name, state in STATES.items():
        if state.get("Resource") == "arn:aws:states:::lambda:invoke":
            assert "ResultSelector" in state, name
            assert all(v.startswith("$.Payload") for v in state["ResultSelector"].values())


def test_definition_run_trainer_waits_for_the_token_with_heartbeat() -> None:
    run = STATES["Run Trainer"]
    assert run["Resource"] == "arn:aws:states:::lambda:invoke.waitForTaskToken"
    assert run["Parameters"]["Payload"]["task_token.$"] == "$$.Task.Token"
    assert run["HeartbeatSecondsPath"] == "$.heartbeat_timeout_seconds"
    recovered = next(c for c in run["Catch"] if c["Next"] == "Preserve Checkpoint")
    # moto names a heartbeat timeout States.Timeout; AWS, States.HeartbeatTimeout.
    assert {
        "Spot.Interrupted",
        "Instance.Lost",
        "Trainer.Failed",
        "States.HeartbeatTimeout",
        "States.Timeout",
    } <= set(recovered["ErrorEquals"])


def test_definition_error_names_are_the_contract() -> None:
    names = {
        error
        for state in STATES.values()
        for clause in (*state.get("Retry", []), *state.get("Catch", []))
        for error in clause["ErrorEquals"]
    }
    ours = {name for name in names if not name.startswith(("States.", "Lambda."))}
    assert ours <= set(ERROR_NAMES)


def test_definition_the_capacity_wait_is_computed() -> None:
    wait = STATES["Wait For Capacity"]
    assert wait["Type"] == "Wait" and wait["SecondsPath"] == "$.capacity.wait_seconds"


def test_definition_every_placeholder_has_a_substitution() -> None:
    properties = TEMPLATE["Resources"]["TrainingJobStateMachine"]["Properties"]
    placeholders = set(re.findall(r"\$\{([^}]+)\}", ASL_PATH.read_text()))
    assert placeholders == set(properties["DefinitionSubstitutions"])
    assert properties["DefinitionUri"] == "statemachine/training_job.asl.json"


def test_definition_substituted_from_the_template_names_each_function() -> None:
    arns = {
        f"{logical_id}.Arn": f"arn:aws:lambda:us-east-1:123456789012:function:{logical_id}"
        for logical_id in TEMPLATE["Resources"]
    }
    text = state_machine_definition(
        TEMPLATE, "TrainingJobStateMachine", Resolver(TEMPLATE, attributes=arns), base_dir=REPO
    )
    assert unsubstituted_variables(text) == set()
    functions = {
        state["Parameters"]["FunctionName"]
        for state in json.loads(text)["States"].values()
        if state["Type"] == "Task"
    }
    assert {name.rsplit(":", 1)[-1] for name in functions} == {
        "RequestCapacityFunction",
        "PrepareVolumesFunction",
        "StartTrainerFunction",
        "PreserveCheckpointFunction",
        "ReleaseAttemptFunction",
        "FinalizeJobFunction",
    }


@pytest.mark.parametrize("name", sorted(STATES))
def test_definition_state_names_are_phrases(name: str) -> None:
    assert re.fullmatch(r"[A-Z][a-z]+( [A-Za-z]+)*\??", name), name
