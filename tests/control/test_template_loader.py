"""spotrun_local.template: short-form tags, intrinsic functions, SAM globals and substitutions."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from spotrun_local.template import (
    Resolver,
    TemplateError,
    function_environment,
    load_template,
    serverless_functions,
    state_machine_definition,
    unsubstituted_variables,
)

SAMPLE = """
Parameters:
  Names: {Type: CommaDelimitedList, Default: "a,b"}
  Email: {Type: String, Default: ""}
  Size: {Type: Number, Default: 30}
Conditions:
  HasEmail: !Not [!Equals [!Ref Email, ""]]
Mappings:
  Zones: {us-east-1: {first: us-east-1a}}
Globals:
  Function:
    Runtime: python3.11
    Layers: [!Ref Layer]
    Environment:
      Variables: {TABLE: !Ref Table, SIZE: !Ref Size}
Resources:
  Table: {Type: AWS::DynamoDB::Table}
  Layer: {Type: AWS::Serverless::LayerVersion}
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: functions/fn/
      Layers: [extra]
      Environment:
        Variables:
          NAMES: !Join [",", !Ref Names]
          ARN: !GetAtt Table.Arn
          SUB: !Sub "${AWS::Region}/${Table}/${Table.Arn}/${!Literal}"
          SUB_VARS: !Sub ["${X}-${AWS::AccountId}", {X: !Select [1, !Ref Names]}]
          EMAIL: !If [HasEmail, !Ref Email, !Ref AWS::NoValue]
          ZONE: !FindInMap [Zones, !Ref AWS::Region, first]
          SPLIT: !Select [0, !Split ["-", "x-y"]]
          B64: !Base64 "hi"
          IMPORTED: !ImportValue shared-vpc
  Machine:
    Type: AWS::Serverless::StateMachine
    Properties:
      DefinitionUri: machine.asl.json
      DefinitionSubstitutions:
        FnArn: !GetAtt Fn.Arn
"""


@pytest.fixture
def template_path(tmp_path: Path) -> Path:
    path = tmp_path / "template.yaml"
    path.write_text(SAMPLE)
    (tmp_path / "machine.asl.json").write_text(
        json.dumps({"StartAt": "A", "States": {"A": {"Resource": "${FnArn}", "x": "${Other}"}}})
    )
    return path


def resolver_for(template: dict) -> Resolver:
    return Resolver(
        template,
        physical_ids={"Table": "jobs", "Layer": "arn:layer:1", "Fn": "fn-physical"},
        attributes={
            "Table.Arn": "arn:aws:dynamodb:us-east-1:123456789012:table/jobs",
            "Fn.Arn": "arn:aws:lambda:us-east-1:123456789012:function:fn-physical",
        },
        exports={"shared-vpc": "vpc-1"},
    )


def test_load_template_turns_short_forms_into_long_forms(template_path: Path) -> None:
    template = load_template(template_path)
    variables = template["Resources"]["Fn"]["Properties"]["Environment"]["Variables"]
    assert variables["ARN"] == {"Fn::GetAtt": ["Table", "Arn"]}
    assert variables["NAMES"] == {"Fn::Join": [",", {"Ref": "Names"}]}
    assert template["Conditions"]["HasEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "Email"}, ""]}]
    }


def test_function_environment_merges_globals_and_resolves(template_path: Path) -> None:
    template = load_template(template_path)
    env = function_environment(template, "Fn", resolver_for(template))
    assert env == {
        "TABLE": "jobs",
        "SIZE": "30",
        "NAMES": "a,b",
        "ARN": "arn:aws:dynamodb:us-east-1:123456789012:table/jobs",
        "SUB": "us-east-1/jobs/arn:aws:dynamodb:us-east-1:123456789012:table/jobs/${Literal}",
        "SUB_VARS": "b-123456789012",
        "ZONE": "us-east-1a",
        "SPLIT": "x",
        "B64": base64.b64encode(b"hi").decode(),
        "IMPORTED": "vpc-1",
    }  # EMAIL is AWS::NoValue: the condition is false, so the key is gone


def test_serverless_functions_appends_global_layers(template_path: Path) -> None:
    functions = serverless_functions(load_template(template_path))
    assert functions["Fn"]["Layers"] == [{"Ref": "Layer"}, "extra"]
    assert functions["Fn"]["Runtime"] == "python3.11"


def test_state_machine_definition_substitutes_what_it_is_given(template_path: Path) -> None:
    template = load_template(template_path)
    text = state_machine_definition(
        template, "Machine", resolver_for(template), base_dir=template_path.parent
    )
    state = json.loads(text)["States"]["A"]
    assert state["Resource"].endswith(":function:fn-physical")
    assert unsubstituted_variables(text) == {"Other"}


def test_resolver_parameters_override_defaults_and_conditions_follow(template_path: Path) -> None:
    template = load_template(template_path)
    resolver = Resolver(template, parameters={"Email": "me@example.com", "Names": ["x", "y"]})
    assert resolver.condition("HasEmail") is True
    assert resolver.resolve({"Fn::Join": ["+", {"Ref": "Names"}]}) == "x+y"


def test_resolver_names_what_it_cannot_resolve(template_path: Path) -> None:
    template = load_template(template_path)
    resolver = Resolver(template)
    with pytest.raises(TemplateError, match="Ref Table"):
        resolver.resolve({"Ref": "Table"})
    with pytest.raises(TemplateError, match="Fn::Nope"):
        resolver.resolve({"Fn::Nope": 1})
