"""Deploy ``template.yaml`` onto moto: the template is the only description of the application.

What CloudFormation would create, this creates in moto (bucket, table, topic,
queues, IAM roles and instance profiles, security groups, launch templates, the
state machine with its ``DefinitionSubstitutions`` resolved, the event rules);
what moto cannot run (functions, rule targets, the API) is returned as resolved
specs for the local cloud's own runners. Add a function or a rule to the
template and the local cloud has it.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spotrun_local.aws import ACCOUNT_ID, REGION, MotoServer
from spotrun_local.lambdas import FunctionSpec
from spotrun_local.template import (
    Resolver,
    TemplateError,
    function_environment,
    load_template,
    serverless_functions,
    state_machine_definition,
    unsubstituted_variables,
)

log = logging.getLogger(__name__)

BOOTSTRAP_KEY = "spotrun/bootstrap.sh"
_IMPLICIT_API = "ServerlessRestApi"  # SAM's name for the API it makes from Api events


@dataclass(frozen=True)
class RuleTarget:
    """Where a rule sends a matching event, and how the event is shaped first."""

    arn: str
    input: str | None = None
    input_path: str | None = None
    input_transformer: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class RuleSpec:
    """An EventBridge rule: a pattern or a schedule, and its targets."""

    name: str
    logical_id: str
    pattern: Mapping[str, Any] | None
    schedule: str | None
    enabled: bool
    targets: tuple[RuleTarget, ...]
    event_bus: str = "default"


@dataclass(frozen=True)
class ApiRoute:
    """One route of a REST API to a function, as API Gateway's proxy integration."""

    method: str
    path: str
    function: str  # logical id
    api: str  # logical id of the API
    iam_auth: bool
    stage: str = "Prod"  # SAM's stage of the implicit API
    # The API's model of the body when the route validates it (RequestModel with
    # ValidateBody), and the API's BAD_REQUEST_BODY gateway response, if it has one.
    body_schema: Mapping[str, Any] | None = None
    bad_body_response: Mapping[str, Any] | None = None


@dataclass
class Stack:
    """What a deployment produced: moto's physical ids and the specs the runners need."""

    name: str
    template_path: Path
    template: dict[str, Any]
    resolver: Resolver
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    state_machines: dict[str, str] = field(default_factory=dict)  # logical id -> ARN
    rules: list[RuleSpec] = field(default_factory=list)
    routes: list[ApiRoute] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)

    def physical_id(self, logical_id: str) -> Any:
        return self.resolver.ref(logical_id)

    def resources_of_type(self, kind: str) -> list[str]:
        return [
            logical_id
            for logical_id, resource in (self.template.get("Resources") or {}).items()
            if resource.get("Type") == kind
        ]

    @property
    def bucket(self) -> str:
        """The jobs bucket: the template's only bucket, or the one named ``JobsBucket``."""
        buckets = self.resources_of_type("AWS::S3::Bucket")
        name = "JobsBucket" if "JobsBucket" in buckets else (buckets[0] if buckets else None)
        if name is None:
            raise TemplateError("the template has no AWS::S3::Bucket")
        return self.physical_id(name)


def deploy(
    template_path: str | Path,
    aws: MotoServer,
    *,
    parameters: Mapping[str, Any] | None = None,
    stack_name: str = "spotrun",
    bootstrap_path: str | Path | None = None,
) -> Stack:
    """Create the template's resources in moto; return the resolved :class:`Stack`."""
    template_path = Path(template_path).resolve()
    template = load_template(template_path)
    session = aws.session()
    clients = _Clients(aws, session)
    given = dict(parameters or {})
    given.update(_ec2_parameter_defaults(template, given, clients))
    resolver = Resolver(
        template, parameters=given, region=REGION, account_id=ACCOUNT_ID, stack_name=stack_name
    )
    stack = Stack(stack_name, template_path, template, resolver)
    _name_resources(stack)
    _create_resources(stack, clients)
    _collect_functions(stack)
    _collect_rules_and_routes(stack)
    _create_state_machines(stack, clients)
    _create_rules(stack, clients)
    if bootstrap_path is not None and stack.resources_of_type("AWS::S3::Bucket"):
        clients.s3.upload_file(str(bootstrap_path), stack.bucket, BOOTSTRAP_KEY)
    stack.outputs = {
        name: _resolve_or_none(resolver, output.get("Value"))
        for name, output in (template.get("Outputs") or {}).items()
    }
    return stack


class _Clients:
    def __init__(self, aws: MotoServer, session) -> None:
        self._aws, self._session, self._cache = aws, session, {}

    def __getattr__(self, service: str):
        if service.startswith("_"):
            raise AttributeError(service)
        if service not in self._cache:
            self._cache[service] = self._aws.client(service, self._session)
        return self._cache[service]


def _resolve_or_none(resolver: Resolver, value: Any) -> Any:
    try:
        return resolver.resolve(value)
    except TemplateError:
        return None


# -- parameters --------------------------------------------------------------------------


def _ec2_parameter_defaults(template: dict, given: Mapping[str, Any], clients: _Clients) -> dict:
    """Values for EC2-typed parameters left empty, taken from moto's default VPC.

    On AWS the deployer passes subnets, a VPC or an AMI; here the account is
    moto's, so the natural values are its default VPC, subnets and images.
    """
    values: dict[str, Any] = {}
    for name, declaration in (template.get("Parameters") or {}).items():
        kind = str(declaration.get("Type", ""))
        if name in given or (declaration.get("Default") not in (None, "") and "SSM" not in kind):
            continue
        if "AWS::EC2::Subnet::Id" in kind:
            subnets = clients.ec2.describe_subnets(
                Filters=[{"Name": "default-for-az", "Values": ["true"]}]
            )["Subnets"]
            subnets.sort(key=lambda subnet: subnet["AvailabilityZone"])
            ids = [subnet["SubnetId"] for subnet in subnets]
            values[name] = ids if kind.startswith("List<") else ids[0]
        elif "AWS::EC2::VPC::Id" in kind:
            vpcs = clients.ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
            values[name] = vpcs["Vpcs"][0]["VpcId"]
        elif "AWS::EC2::SecurityGroup::Id" in kind:
            groups = clients.ec2.describe_security_groups(GroupNames=["default"])
            group_id = groups["SecurityGroups"][0]["GroupId"]
            values[name] = [group_id] if kind.startswith("List<") else group_id
        elif "AWS::EC2::Image::Id" in kind:
            images = clients.ec2.describe_images(Owners=["amazon"])["Images"]
            values[name] = sorted(image["ImageId"] for image in images)[0]
        elif "AWS::EC2::KeyPair::KeyName" in kind:
            values[name] = ""
    return values


# -- physical ids that do not depend on moto ---------------------------------------------


def _name_resources(stack: Stack) -> None:
    """Give every resource the Ref/GetAtt values CloudFormation would, before creating any.

    Names and ARNs are deterministic, so a property may refer to a resource
    created later (the state machine to a function, a function to the machine).
    """
    resolver = stack.resolver
    for logical_id, resource in (stack.template.get("Resources") or {}).items():
        kind = resource.get("Type", "")
        properties = resource.get("Properties") or {}
        default = f"{stack.name}-{logical_id}"

        def name(key: str, fallback: str = default, props: Mapping = properties) -> str:
            value = _resolve_or_none(resolver, props.get(key))
            return str(value) if value else fallback

        ids, attrs = resolver.physical_ids, resolver.attributes
        if kind == "AWS::Serverless::Function":
            function_name = name("FunctionName", default[:64])
            ids[logical_id] = function_name
            attrs[f"{logical_id}.Arn"] = _arn("lambda", f"function:{function_name}")
        elif kind in ("AWS::Serverless::LayerVersion", "AWS::Lambda::LayerVersion"):
            ids[logical_id] = _arn("lambda", f"layer:{name('LayerName')}:1")
        elif kind == "AWS::S3::Bucket":
            bucket = name("BucketName", f"{default}-{ACCOUNT_ID}".lower()[:63])
            ids[logical_id] = bucket
            attrs[f"{logical_id}.Arn"] = f"arn:aws:s3:::{bucket}"
            attrs[f"{logical_id}.DomainName"] = f"{bucket}.s3.amazonaws.com"
        elif kind in ("AWS::DynamoDB::Table", "AWS::Serverless::SimpleTable"):
            table = name("TableName")
            ids[logical_id] = table
            attrs[f"{logical_id}.Arn"] = _arn("dynamodb", f"table/{table}")
        elif kind == "AWS::SNS::Topic":
            topic = name("TopicName")
            ids[logical_id] = _arn("sns", topic)
            attrs[f"{logical_id}.TopicName"] = topic
        elif kind == "AWS::SQS::Queue":
            queue = name("QueueName")
            ids[logical_id] = f"https://sqs.{REGION}.amazonaws.com/{ACCOUNT_ID}/{queue}"
            attrs[f"{logical_id}.Arn"] = _arn("sqs", queue)
            attrs[f"{logical_id}.QueueName"] = queue
        elif kind in ("AWS::Serverless::StateMachine", "AWS::StepFunctions::StateMachine"):
            machine = name("Name", name("StateMachineName"))
            ids[logical_id] = _arn("states", f"stateMachine:{machine}")
            attrs[f"{logical_id}.Name"] = machine
        elif kind == "AWS::Events::Rule":
            rule = name("Name")
            ids[logical_id] = rule
            attrs[f"{logical_id}.Arn"] = _arn("events", f"rule/{rule}")
        elif kind == "AWS::IAM::Role":
            role = name("RoleName")
            ids[logical_id] = role
            attrs[f"{logical_id}.Arn"] = f"arn:aws:iam::{ACCOUNT_ID}:role/{role}"
            attrs[f"{logical_id}.RoleId"] = f"AROA{secrets.token_hex(8).upper()}"
        elif kind == "AWS::IAM::InstanceProfile":
            profile = name("InstanceProfileName")
            ids[logical_id] = profile
            attrs[f"{logical_id}.Arn"] = f"arn:aws:iam::{ACCOUNT_ID}:instance-profile/{profile}"
        elif kind in ("AWS::IAM::ManagedPolicy", "AWS::IAM::Policy"):
            ids[logical_id] = f"arn:aws:iam::{ACCOUNT_ID}:policy/{name('ManagedPolicyName')}"
        elif kind == "AWS::Serverless::Api":
            ids[logical_id] = secrets.token_hex(5)
            attrs[f"{logical_id}.RootResourceId"] = secrets.token_hex(5)
        elif kind not in ("AWS::EC2::LaunchTemplate", "AWS::EC2::SecurityGroup"):
            ids[logical_id] = default  # e.g. a log group: nothing refers to more than a name
            attrs.setdefault(f"{logical_id}.Arn", _arn("local", default))
    if _has_implicit_api(stack.template):
        resolver.physical_ids[_IMPLICIT_API] = secrets.token_hex(5)


def _arn(service: str, resource: str) -> str:
    return f"arn:aws:{service}:{REGION}:{ACCOUNT_ID}:{resource}"


def _has_implicit_api(template: Mapping[str, Any]) -> bool:
    for properties in serverless_functions(template).values():
        for event in (properties.get("Events") or {}).values():
            if event.get("Type") == "Api" and "RestApiId" not in (event.get("Properties") or {}):
                return True
    return False


# -- resources moto holds -----------------------------------------------------------------


def _create_resources(stack: Stack, clients: _Clients) -> None:
    order = (
        "AWS::IAM::Role",
        "AWS::IAM::InstanceProfile",
        "AWS::S3::Bucket",
        "AWS::DynamoDB::Table",
        "AWS::Serverless::SimpleTable",
        "AWS::SNS::Topic",
        "AWS::SQS::Queue",
        "AWS::EC2::SecurityGroup",
        "AWS::EC2::LaunchTemplate",
    )
    for kind in order:
        for logical_id in stack.resources_of_type(kind):
            resource = stack.template["Resources"][logical_id]
            if "Condition" in resource and not stack.resolver.condition(resource["Condition"]):
                continue
            properties = stack.resolver.resolve(resource.get("Properties") or {})
            creator = _CREATORS[kind]
            creator(stack, clients, logical_id, properties)


def _create_role(stack: Stack, clients: _Clients, logical_id: str, properties: dict) -> None:
    policy = properties.get("AssumeRolePolicyDocument") or {}
    clients.iam.create_role(
        RoleName=stack.physical_id(logical_id),
        AssumeRolePolicyDocument=policy if isinstance(policy, str) else json.dumps(policy),
        Path=properties.get("Path", "/"),
    )


def _create_instance_profile(stack: Stack, clients: _Clients, logical_id: str, props: dict):
    profile = stack.physical_id(logical_id)
    clients.iam.create_instance_profile(InstanceProfileName=profile, Path=props.get("Path", "/"))
    for role in props.get("Roles") or []:
        clients.iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=role)


def _create_bucket(stack: Stack, clients: _Clients, logical_id: str, properties: dict) -> None:
    bucket = stack.physical_id(logical_id)
    clients.s3.create_bucket(Bucket=bucket)
    notification = properties.get("NotificationConfiguration") or {}
    eventbridge = notification.get("EventBridgeConfiguration") or {}
    if str(eventbridge.get("EventBridgeEnabled", "false")).lower() == "true":
        clients.s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"EventBridgeConfiguration": {}}
        )
    if (properties.get("VersioningConfiguration") or {}).get("Status") == "Enabled":
        clients.s3.put_bucket_versioning(
            Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
        )


def _create_table(stack: Stack, clients: _Clients, logical_id: str, properties: dict) -> None:
    table = stack.physical_id(logical_id)
    if "PrimaryKey" in properties or "KeySchema" not in properties:  # SimpleTable
        key = properties.get("PrimaryKey") or {"Name": "id", "Type": "String"}
        kind = {"String": "S", "Number": "N", "Binary": "B"}[key.get("Type", "String")]
        properties = {
            "KeySchema": [{"AttributeName": key["Name"], "KeyType": "HASH"}],
            "AttributeDefinitions": [{"AttributeName": key["Name"], "AttributeType": kind}],
        }
    arguments: dict[str, Any] = {
        "TableName": table,
        "KeySchema": properties["KeySchema"],
        "AttributeDefinitions": properties["AttributeDefinitions"],
        "BillingMode": properties.get("BillingMode", "PAY_PER_REQUEST"),
    }
    if arguments["BillingMode"] == "PROVISIONED":
        arguments["ProvisionedThroughput"] = properties["ProvisionedThroughput"]
    for key in ("GlobalSecondaryIndexes", "LocalSecondaryIndexes"):
        if properties.get(key):
            arguments[key] = properties[key]
    clients.dynamodb.create_table(**arguments)
    ttl = properties.get("TimeToLiveSpecification")
    if ttl and str(ttl.get("Enabled")).lower() == "true":
        clients.dynamodb.update_time_to_live(
            TableName=table,
            TimeToLiveSpecification={"Enabled": True, "AttributeName": ttl["AttributeName"]},
        )


def _create_topic(stack: Stack, clients: _Clients, logical_id: str, properties: dict) -> None:
    topic = stack.resolver.get_att(logical_id, "TopicName")
    clients.sns.create_topic(Name=topic)
    for subscription in properties.get("Subscription") or []:
        clients.sns.subscribe(
            TopicArn=stack.physical_id(logical_id),
            Protocol=subscription["Protocol"],
            Endpoint=subscription["Endpoint"],
        )


def _create_queue(stack: Stack, clients: _Clients, logical_id: str, properties: dict) -> None:
    attributes = {
        key: str(value)
        for key, value in properties.items()
        if key in ("VisibilityTimeout", "MessageRetentionPeriod", "DelaySeconds")
    }
    clients.sqs.create_queue(
        QueueName=stack.resolver.get_att(logical_id, "QueueName"), Attributes=attributes
    )


def _create_security_group(stack: Stack, clients: _Clients, logical_id: str, props: dict):
    group = clients.ec2.create_security_group(
        GroupName=props.get("GroupName") or f"{stack.name}-{logical_id}",
        Description=props.get("GroupDescription", logical_id),
        **({"VpcId": props["VpcId"]} if props.get("VpcId") else {}),
    )
    stack.resolver.physical_ids[logical_id] = group["GroupId"]
    stack.resolver.attributes[f"{logical_id}.GroupId"] = group["GroupId"]


def _create_launch_template(stack: Stack, clients: _Clients, logical_id: str, props: dict):
    name = props.get("LaunchTemplateName") or f"{stack.name}-{logical_id}"
    created = clients.ec2.create_launch_template(
        LaunchTemplateName=name,
        LaunchTemplateData=props.get("LaunchTemplateData") or {},
        **(
            {"TagSpecifications": props["TagSpecifications"]}
            if "TagSpecifications" in props
            else {}
        ),
    )["LaunchTemplate"]
    stack.resolver.physical_ids[logical_id] = created["LaunchTemplateId"]
    for attribute, key in (
        ("LaunchTemplateId", "LaunchTemplateId"),
        ("LatestVersionNumber", "LatestVersionNumber"),
        ("DefaultVersionNumber", "DefaultVersionNumber"),
    ):
        stack.resolver.attributes[f"{logical_id}.{attribute}"] = str(created[key])


_CREATORS = {
    "AWS::IAM::Role": _create_role,
    "AWS::IAM::InstanceProfile": _create_instance_profile,
    "AWS::S3::Bucket": _create_bucket,
    "AWS::DynamoDB::Table": _create_table,
    "AWS::Serverless::SimpleTable": _create_table,
    "AWS::SNS::Topic": _create_topic,
    "AWS::SQS::Queue": _create_queue,
    "AWS::EC2::SecurityGroup": _create_security_group,
    "AWS::EC2::LaunchTemplate": _create_launch_template,
}


# -- functions, state machines, rules, routes ------------------------------------------------


def _collect_functions(stack: Stack) -> None:
    base = stack.template_path.parent
    layers = {
        stack.physical_id(logical_id): base
        / str((stack.template["Resources"][logical_id].get("Properties") or {})["ContentUri"])
        for logical_id in (
            *stack.resources_of_type("AWS::Serverless::LayerVersion"),
            *stack.resources_of_type("AWS::Lambda::LayerVersion"),
        )
        if isinstance(
            (stack.template["Resources"][logical_id].get("Properties") or {}).get("ContentUri"),
            str,
        )
    }
    for logical_id, properties in serverless_functions(stack.template).items():
        layer_arns = stack.resolver.resolve(properties.get("Layers") or [])
        missing = [arn for arn in layer_arns if arn not in layers]
        if missing:
            raise TemplateError(f"{logical_id}: layers not in the template: {missing}")
        stack.functions[logical_id] = FunctionSpec(
            logical_id=logical_id,
            name=stack.physical_id(logical_id),
            arn=stack.resolver.get_att(logical_id, "Arn"),
            handler=str(properties.get("Handler", "app.lambda_handler")),
            code_dir=(base / str(properties.get("CodeUri", "."))).resolve(),
            layer_dirs=tuple(layers[arn].resolve() for arn in layer_arns),
            environment=function_environment(stack.template, logical_id, stack.resolver),
            timeout_seconds=float(stack.resolver.resolve(properties.get("Timeout", 3))),
            memory_mb=int(stack.resolver.resolve(properties.get("MemorySize", 128))),
        )


def _collect_rules_and_routes(stack: Stack) -> None:
    resolver = stack.resolver
    for logical_id in stack.resources_of_type("AWS::Events::Rule"):
        properties = resolver.resolve(stack.template["Resources"][logical_id].get("Properties"))
        stack.rules.append(
            RuleSpec(
                name=stack.physical_id(logical_id),
                logical_id=logical_id,
                pattern=properties.get("EventPattern"),
                schedule=properties.get("ScheduleExpression"),
                enabled=properties.get("State", "ENABLED") == "ENABLED",
                targets=tuple(
                    RuleTarget(
                        arn=target["Arn"],
                        input=target.get("Input"),
                        input_path=target.get("InputPath"),
                        input_transformer=target.get("InputTransformer"),
                    )
                    for target in properties.get("Targets") or []
                ),
                event_bus=_bus_name(properties.get("EventBusName")),
            )
        )
    sources: list[tuple[str, dict, str]] = [
        (logical_id, properties, resolver.get_att(logical_id, "Arn"))
        for logical_id, properties in serverless_functions(stack.template).items()
    ]
    for logical_id in stack.resources_of_type("AWS::Serverless::StateMachine"):
        properties = stack.template["Resources"][logical_id].get("Properties") or {}
        sources.append((logical_id, properties, stack.physical_id(logical_id)))
    api_auth = _api_default_auth(stack)
    for logical_id, properties, target_arn in sources:
        for event_id, event in (properties.get("Events") or {}).items():
            kind = event.get("Type")
            event_properties = resolver.resolve(event.get("Properties") or {})
            target = RuleTarget(
                arn=target_arn,
                input=event_properties.get("Input"),
                input_path=event_properties.get("InputPath"),
                input_transformer=event_properties.get("InputTransformer"),
            )
            rule_name = event_properties.get("RuleName") or event_properties.get("Name")
            rule_name = rule_name or f"{stack.name}-{logical_id}{event_id}"[:64]
            if kind in ("EventBridgeRule", "CloudWatchEvent"):
                stack.rules.append(
                    RuleSpec(
                        name=rule_name,
                        logical_id=f"{logical_id}{event_id}",
                        pattern=event_properties.get("Pattern"),
                        schedule=None,
                        enabled=event_properties.get("State", "ENABLED") == "ENABLED",
                        targets=(target,),
                        event_bus=_bus_name(event_properties.get("EventBusName")),
                    )
                )
            elif kind == "Schedule":
                enabled = event_properties.get("Enabled", True) in (True, "true", "True")
                enabled = enabled and event_properties.get("State", "ENABLED") == "ENABLED"
                stack.rules.append(
                    RuleSpec(
                        name=rule_name,
                        logical_id=f"{logical_id}{event_id}",
                        pattern=None,
                        schedule=event_properties["Schedule"],
                        enabled=enabled,
                        targets=(target,),
                    )
                )
            elif kind == "Api":
                api_id = (event.get("Properties") or {}).get("RestApiId", {"Ref": _IMPLICIT_API})
                api = api_id.get("Ref") if isinstance(api_id, dict) else str(api_id)
                authorizer = (event_properties.get("Auth") or {}).get("Authorizer")
                authorizer = authorizer or api_auth.get(api)
                api_properties = _api_properties(stack, api)
                model = event_properties.get("RequestModel") or {}
                body_schema = None
                if model.get("ValidateBody"):
                    models = api_properties.get("Models") or {}
                    if model.get("Model") not in models:
                        raise TemplateError(
                            f"{logical_id}.{event_id}: no model {model.get('Model')!r} in {api}"
                        )
                    body_schema = models[model["Model"]]
                responses = api_properties.get("GatewayResponses") or {}
                stack.routes.append(
                    ApiRoute(
                        method=str(event_properties["Method"]).upper(),
                        path=str(event_properties["Path"]),
                        function=logical_id,
                        api=api,
                        iam_auth=authorizer == "AWS_IAM",
                        stage=str(api_properties.get("StageName", "Prod")),
                        body_schema=body_schema,
                        bad_body_response=responses.get("BAD_REQUEST_BODY"),
                    )
                )


def _bus_name(value: Any) -> str:
    if not value:
        return "default"
    return str(value).rsplit("/", 1)[-1]


def _api_properties(stack: Stack, api: str) -> dict[str, Any]:
    """The resolved properties of an ``AWS::Serverless::Api`` (none for the implicit one)."""
    if api == _IMPLICIT_API or api not in stack.template["Resources"]:
        return {}
    properties = stack.template["Resources"][api].get("Properties") or {}
    return stack.resolver.resolve(properties)


def _api_default_auth(stack: Stack) -> dict[str, str | None]:
    global_api = ((stack.template.get("Globals") or {}).get("Api")) or {}
    default = (global_api.get("Auth") or {}).get("DefaultAuthorizer")
    auth = {_IMPLICIT_API: default}
    for logical_id in stack.resources_of_type("AWS::Serverless::Api"):
        properties = stack.template["Resources"][logical_id].get("Properties") or {}
        auth[logical_id] = (properties.get("Auth") or {}).get("DefaultAuthorizer", default)
    return auth


def _create_state_machines(stack: Stack, clients: _Clients) -> None:
    for logical_id in stack.resources_of_type("AWS::Serverless::StateMachine"):
        definition = state_machine_definition(
            stack.template, logical_id, stack.resolver, base_dir=stack.template_path.parent
        )
        left = unsubstituted_variables(definition)
        if left:
            raise TemplateError(f"{logical_id}: no substitution for {sorted(left)}")
        properties = stack.template["Resources"][logical_id].get("Properties") or {}
        role = _resolve_or_none(stack.resolver, properties.get("Role"))
        arn = clients.stepfunctions.create_state_machine(
            name=stack.resolver.get_att(logical_id, "Name"),
            definition=definition,
            roleArn=role or f"arn:aws:iam::{ACCOUNT_ID}:role/{stack.name}-{logical_id}Role",
            type=str(properties.get("Type", "STANDARD")),
        )["stateMachineArn"]
        stack.state_machines[logical_id] = arn


def _create_rules(stack: Stack, clients: _Clients) -> None:
    """Put each rule in moto too (pattern or schedule); its targets stay with the router."""
    buses = {rule.event_bus for rule in stack.rules} - {"default"}
    for bus in sorted(buses):
        clients.events.create_event_bus(Name=bus)
    for rule in stack.rules:
        arguments: dict[str, Any] = {
            "Name": rule.name,
            "State": "ENABLED" if rule.enabled else "DISABLED",
            "EventBusName": rule.event_bus,
        }
        if rule.pattern is not None:
            arguments["EventPattern"] = json.dumps(rule.pattern)
        if rule.schedule is not None:
            arguments["ScheduleExpression"] = rule.schedule
        clients.events.put_rule(**arguments)
