"""Reading ``template.yaml`` outside CloudFormation: short-form tags and intrinsic functions.

Two consumers share this module: the control-plane tests (which deploy the real
ASL on moto with the substitutions the template gives it) and the local cloud
(which also runs every function with the environment the template gives it).
Neither has CloudFormation, so this module does the small part of it they need:

* :func:`load_template` parses the YAML, turning CloudFormation's short-form tags
  (``!Ref``, ``!Sub``, ``!GetAtt`` …) into their long form (``{"Ref": …}``,
  ``{"Fn::Sub": …}``) so the rest of the code sees one shape.
* :class:`Resolver` evaluates intrinsic functions against a mapping of logical
  id → physical id (what ``Ref`` returns), attribute values (what ``GetAtt``
  returns), parameter values and pseudo parameters.
* :func:`function_environment`, :func:`state_machine_definition` and
  :func:`serverless_functions` apply SAM's ``Globals`` and
  ``DefinitionSubstitutions`` the way SAM does.

Example::

    template = load_template("template.yaml")
    resolver = Resolver(
        template,
        physical_ids={"JobsTable": "spotrun-jobs", "JobsBucket": "spotrun-jobs-123"},
        attributes={"RequestCapacityFunction.Arn": "arn:aws:lambda:…:function:rc"},
        parameters={"Subnets": "subnet-1,subnet-2"},
    )
    env = function_environment(template, "RequestCapacityFunction", resolver)
    asl = state_machine_definition(template, "TrainingJobStateMachine", resolver, base_dir=".")

Only what the project's template uses is supported; anything else raises
:class:`TemplateError` naming the construct, rather than guessing.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "NO_VALUE",
    "Resolver",
    "TemplateError",
    "function_environment",
    "load_template",
    "serverless_functions",
    "state_machine_definition",
    "unsubstituted_variables",
]


class TemplateError(Exception):
    """The template uses something this resolver cannot evaluate, or lacks a value."""


class _NoValue:
    """``AWS::NoValue``: removes the key (or list item) that holds it."""

    def __repr__(self) -> str:
        return "AWS::NoValue"


NO_VALUE = _NoValue()

# Short-form tag → long-form key. ``!GetAtt`` and ``!Ref``/``!Condition`` are
# special-cased in the constructor below.
_FN_TAGS = (
    "Base64",
    "Cidr",
    "FindInMap",
    "GetAZs",
    "If",
    "ImportValue",
    "Join",
    "Select",
    "Split",
    "Sub",
    "Transform",
    "And",
    "Equals",
    "Not",
    "Or",
    "Length",
    "ToJsonString",
)


class _TemplateLoader(yaml.SafeLoader):
    """SafeLoader that knows CloudFormation's short-form tags."""


def _construct_node(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_mapping(node, deep=True)


def _make_fn_constructor(key: str):
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
        return {key: _construct_node(loader, node)}

    return construct


def _construct_getatt(loader: yaml.SafeLoader, node: yaml.Node) -> dict[str, Any]:
    value = _construct_node(loader, node)
    if isinstance(value, str):
        # "!GetAtt Resource.Attribute.Maybe.Dotted": only the first dot splits.
        logical_id, _, attribute = value.partition(".")
        value = [logical_id, attribute]
    return {"Fn::GetAtt": value}


_TemplateLoader.add_constructor("!Ref", _make_fn_constructor("Ref"))
_TemplateLoader.add_constructor("!Condition", _make_fn_constructor("Condition"))
_TemplateLoader.add_constructor("!GetAtt", _construct_getatt)
for _name in _FN_TAGS:
    _TemplateLoader.add_constructor(f"!{_name}", _make_fn_constructor(f"Fn::{_name}"))


def load_template(path: str | Path) -> dict[str, Any]:
    """Parse a CloudFormation/SAM YAML template into plain dicts, with long-form intrinsics."""
    with open(path, encoding="utf-8") as stream:
        document = yaml.load(stream, Loader=_TemplateLoader)  # a SafeLoader subclass
    if not isinstance(document, dict):
        raise TemplateError(f"{path}: not a template (top level is {type(document).__name__})")
    return document


_SUB_VARIABLE = re.compile(r"\$\{(!?)([^}]*)\}")


class Resolver:
    """Evaluates intrinsic functions of one template.

    ``physical_ids`` maps a logical id to what ``Ref`` returns for it (a table
    name, a function name, a state machine ARN …). ``attributes`` maps
    ``"LogicalId.Attribute"`` to what ``GetAtt`` returns; when an ``Arn`` is
    asked for and not given, a physical id that already is an ARN is used.
    ``parameters`` overrides parameter defaults; list-typed parameters accept a
    list or a comma-separated string. ``exports`` serves ``Fn::ImportValue``.
    """

    def __init__(
        self,
        template: Mapping[str, Any],
        *,
        physical_ids: Mapping[str, str] | None = None,
        attributes: Mapping[str, Any] | None = None,
        parameters: Mapping[str, Any] | None = None,
        exports: Mapping[str, str] | None = None,
        region: str = "us-east-1",
        account_id: str = "123456789012",
        stack_name: str = "spotrun",
        partition: str = "aws",
    ) -> None:
        self.template = template
        self.physical_ids = dict(physical_ids or {})
        self.attributes = dict(attributes or {})
        self.exports = dict(exports or {})
        self.pseudo = {
            "AWS::Region": region,
            "AWS::AccountId": account_id,
            "AWS::StackName": stack_name,
            "AWS::StackId": (
                f"arn:{partition}:cloudformation:{region}:{account_id}:stack/{stack_name}/local"
            ),
            "AWS::Partition": partition,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::NotificationARNs": [],
            "AWS::NoValue": NO_VALUE,
        }
        self.parameters = self._parameter_values(parameters or {})
        self._conditions: dict[str, bool] = {}

    # -- inputs -------------------------------------------------------------

    def _parameter_values(self, given: Mapping[str, Any]) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name, declaration in (self.template.get("Parameters") or {}).items():
            if name in given:
                value = given[name]
            elif "Default" in declaration:
                value = declaration["Default"]
            else:
                continue  # resolved lazily: a Ref to it raises with the parameter's name
            kind = str(declaration.get("Type", "String"))
            if kind.startswith("List<") or kind == "CommaDelimitedList":
                if isinstance(value, str):
                    value = [item.strip() for item in value.split(",")] if value else []
                else:
                    value = [str(item) for item in value]
            elif not isinstance(value, str):
                value = str(value)
            values[name] = value
        for name, value in given.items():
            values.setdefault(name, value)
        return values

    # -- public -------------------------------------------------------------

    def resolve(self, value: Any) -> Any:
        """Evaluate every intrinsic function inside ``value`` (recursively)."""
        if isinstance(value, list):
            items = [self.resolve(item) for item in value]
            return [item for item in items if item is not NO_VALUE]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, argument), *_ = value.items()
            if key == "Ref":
                return self.ref(argument)
            if key == "Condition":
                return self.condition(argument)
            if key.startswith("Fn::"):
                handler = getattr(self, "_fn_" + key[4:].lower(), None)
                if handler is None:
                    raise TemplateError(f"unsupported intrinsic function {key}")
                return handler(argument)
        resolved = {key: self.resolve(item) for key, item in value.items()}
        return {key: item for key, item in resolved.items() if item is not NO_VALUE}

    def ref(self, name: str) -> Any:
        """What ``Ref name`` returns: a pseudo parameter, parameter, or physical id."""
        if name in self.pseudo:
            return self.pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        if name in self.physical_ids:
            return self.physical_ids[name]
        if name in (self.template.get("Parameters") or {}):
            raise TemplateError(f"parameter {name} has no value and no default")
        raise TemplateError(f"Ref {name}: no physical id given for this logical id")

    def get_att(self, logical_id: str, attribute: str) -> Any:
        """What ``Fn::GetAtt [logical_id, attribute]`` returns."""
        key = f"{logical_id}.{attribute}"
        if key in self.attributes:
            return self.attributes[key]
        physical = self.physical_ids.get(logical_id)
        if attribute == "Arn" and isinstance(physical, str) and physical.startswith("arn:"):
            return physical
        raise TemplateError(f"GetAtt {key}: no value given")

    def condition(self, name: str) -> bool:
        """The value of the template's condition ``name`` (cached)."""
        if name not in self._conditions:
            conditions = self.template.get("Conditions") or {}
            if name not in conditions:
                raise TemplateError(f"unknown condition {name}")
            self._conditions[name] = bool(self.resolve(conditions[name]))
        return self._conditions[name]

    # -- intrinsic functions -------------------------------------------------

    def _fn_getatt(self, argument: Any) -> Any:
        if isinstance(argument, str):
            argument = argument.split(".", 1)
        logical_id, attribute = (self.resolve(part) for part in argument)
        return self.get_att(logical_id, attribute)

    def _fn_sub(self, argument: Any) -> str:
        if isinstance(argument, str):
            text, variables = argument, {}
        else:
            text, variables = argument[0], self.resolve(argument[1])

        def substitute(match: re.Match[str]) -> str:
            if match.group(1):  # "${!Literal}" is the escape for a literal "${Literal}"
                return "${" + match.group(2) + "}"
            name = match.group(2).strip()
            if name in variables:
                value = variables[name]
            elif "." in name and name.split(".", 1)[0] not in self.pseudo:
                value = self.get_att(*name.split(".", 1))
            else:
                value = self.ref(name)
            if isinstance(value, list):
                raise TemplateError(f"Fn::Sub ${{{name}}} is a list; use Fn::Join")
            return str(value)

        return _SUB_VARIABLE.sub(substitute, text)

    def _fn_join(self, argument: Any) -> str:
        delimiter, items = argument
        values = self.resolve(items)
        return str(delimiter).join(str(item) for item in values)

    def _fn_select(self, argument: Any) -> Any:
        index, items = (self.resolve(part) for part in argument)
        return items[int(index)]

    def _fn_split(self, argument: Any) -> list[str]:
        delimiter, text = (self.resolve(part) for part in argument)
        return str(text).split(str(delimiter))

    def _fn_if(self, argument: Any) -> Any:
        name, when_true, when_false = argument
        return self.resolve(when_true if self.condition(name) else when_false)

    def _fn_equals(self, argument: Any) -> bool:
        left, right = (self.resolve(part) for part in argument)
        return _as_comparable(left) == _as_comparable(right)

    def _fn_not(self, argument: Any) -> bool:
        (inner,) = argument
        return not self.resolve(inner)

    def _fn_and(self, argument: Any) -> bool:
        return all(self.resolve(part) for part in argument)

    def _fn_or(self, argument: Any) -> bool:
        return any(self.resolve(part) for part in argument)

    def _fn_findinmap(self, argument: Any) -> Any:
        map_name, top_key, second_key = (self.resolve(part) for part in argument[:3])
        try:
            return self.template["Mappings"][map_name][top_key][second_key]
        except KeyError as missing:
            raise TemplateError(
                f"Fn::FindInMap {map_name}/{top_key}/{second_key}: {missing}"
            ) from None

    def _fn_base64(self, argument: Any) -> str:
        text = str(self.resolve(argument))
        return base64.b64encode(text.encode("utf-8")).decode("ascii")

    def _fn_importvalue(self, argument: Any) -> str:
        name = self.resolve(argument)
        if name not in self.exports:
            raise TemplateError(f"Fn::ImportValue {name}: no such export given")
        return self.exports[name]

    def _fn_getazs(self, argument: Any) -> list[str]:
        region = self.resolve(argument) or self.pseudo["AWS::Region"]
        return [f"{region}{letter}" for letter in "abc"]

    def _fn_length(self, argument: Any) -> int:
        return len(self.resolve(argument))

    def _fn_tojsonstring(self, argument: Any) -> str:
        return json.dumps(self.resolve(argument), separators=(",", ":"))


def _as_comparable(value: Any) -> Any:
    return [str(item) for item in value] if isinstance(value, list) else str(value)


# -- SAM helpers ------------------------------------------------------------


def _resources(template: Mapping[str, Any]) -> Mapping[str, Any]:
    return template.get("Resources") or {}


def serverless_functions(template: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ``AWS::Serverless::Function`` → its properties merged over ``Globals.Function``.

    Merging follows SAM: maps merge key by key (the function wins), lists and
    scalars of the function replace the global ones — except ``Layers``, which
    SAM appends. The result is unresolved; pass pieces through a :class:`Resolver`.
    """
    global_properties = ((template.get("Globals") or {}).get("Function")) or {}
    functions: dict[str, dict[str, Any]] = {}
    for logical_id, resource in _resources(template).items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        functions[logical_id] = _merge_globals(global_properties, resource.get("Properties") or {})
    return functions


def _merge_globals(global_value: Any, local_value: Any, key: str = "") -> Any:
    if isinstance(global_value, dict) and isinstance(local_value, dict):
        merged = dict(global_value)
        for item_key, item in local_value.items():
            merged[item_key] = (
                _merge_globals(global_value[item_key], item, item_key)
                if item_key in global_value
                else item
            )
        return merged
    if key == "Layers" and isinstance(global_value, list) and isinstance(local_value, list):
        return [*global_value, *local_value]
    return local_value


def function_environment(
    template: Mapping[str, Any], logical_id: str, resolver: Resolver
) -> dict[str, str]:
    """The environment variables Lambda would give function ``logical_id``, resolved."""
    functions = serverless_functions(template)
    if logical_id not in functions:
        raise TemplateError(f"{logical_id} is not an AWS::Serverless::Function")
    variables = ((functions[logical_id].get("Environment") or {}).get("Variables")) or {}
    resolved = resolver.resolve(variables)
    return {name: _env_string(value) for name, value in resolved.items()}


def _env_string(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):  # CloudFormation refuses lists; be explicit rather than guess
        raise TemplateError(f"environment value is a list: {value!r}")
    return str(value)


def state_machine_definition(
    template: Mapping[str, Any],
    logical_id: str,
    resolver: Resolver,
    *,
    base_dir: str | Path = ".",
) -> str:
    """The ASL text of ``AWS::Serverless::StateMachine`` ``logical_id`` after substitution.

    SAM replaces each ``${Name}`` of ``DefinitionSubstitutions`` in the
    definition file's text; a ``${…}`` without a substitution is left as it is
    (Step Functions would then reject or misread it, so callers may check with
    :func:`unsubstituted_variables`).
    """
    resource = _resources(template).get(logical_id)
    if not resource or resource.get("Type") != "AWS::Serverless::StateMachine":
        raise TemplateError(f"{logical_id} is not an AWS::Serverless::StateMachine")
    properties = resource.get("Properties") or {}
    if "Definition" in properties:
        text = json.dumps(resolver.resolve(properties["Definition"]))
    elif "DefinitionUri" in properties:
        uri = properties["DefinitionUri"]
        if not isinstance(uri, str):
            raise TemplateError(f"{logical_id}: only a local DefinitionUri path is supported")
        text = (Path(base_dir) / uri).read_text(encoding="utf-8")
    else:
        raise TemplateError(f"{logical_id} has neither Definition nor DefinitionUri")
    substitutions = resolver.resolve(properties.get("DefinitionSubstitutions") or {})
    for name, value in substitutions.items():
        text = text.replace("${" + name + "}", str(value))
    return text


def unsubstituted_variables(definition_text: str) -> set[str]:
    """Names of ``${…}`` placeholders still present in a definition's text."""
    return {match.group(2) for match in _SUB_VARIABLE.finditer(definition_text)}
