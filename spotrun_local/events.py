"""EventBridge delivery: events go through moto's rules, the router carries them to the targets.

moto stores the template's rules and matches events against their patterns,
but cannot deliver to Lambda or Step Functions targets (it raises and fails the
whole ``PutEvents``). So each pattern rule gets one SQS queue as its only target
in moto, and the router takes what arrives there to the template's real targets:
a function (asynchronous invocation, as EventBridge does), a state machine, a
queue or a topic. Events from every source take this one path: S3's own
"Object Created" events, and those the local cloud emits for EC2 and Step
Functions through :meth:`EventRouter.put_event`. Schedules fire from timers.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from spotrun_local.aws import ACCOUNT_ID, REGION, MotoServer
from spotrun_local.deploy import RuleSpec, RuleTarget, Stack
from spotrun_local.lambdas import FunctionPool

log = logging.getLogger(__name__)

_RATE = re.compile(r"rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


@dataclass(frozen=True)
class Delivery:
    """One event handed to one target: what tests and the demo look at."""

    rule: str
    detail_type: str
    target: str
    time: float


def schedule_period_seconds(expression: str) -> float | None:
    """The period of a ``rate(...)`` expression; None for ``cron(...)``."""
    match = _RATE.fullmatch(expression.strip())
    if not match:
        return None
    unit = match.group(2).rstrip("s")
    return int(match.group(1)) * _UNIT_SECONDS[unit]


def shape_input(target: RuleTarget, event: Mapping[str, Any]) -> Any:
    """What the target receives: the event, or its ``Input``/``InputPath``/``InputTransformer``."""
    if target.input is not None:
        return json.loads(target.input)
    if target.input_path:
        from jsonpath_ng.ext import parse

        matches = parse(target.input_path).find(dict(event))
        return matches[0].value if matches else None
    if target.input_transformer:
        from moto.events.utils import EventTemplateParser

        return EventTemplateParser.parse(
            input_template=target.input_transformer.get("InputTemplate"),
            input_paths_map=target.input_transformer.get("InputPathsMap", {}),
            event=dict(event),
        )
    return event


@dataclass
class EventRouter:
    """Routes events of one deployed stack to its rules' targets."""

    stack: Stack
    aws: MotoServer
    pool: FunctionPool
    schedule_scale: float = 1.0  # a demo may run a rate(1 hour) sweeper every few seconds
    deliveries: deque[Delivery] = field(default_factory=lambda: deque(maxlen=10000))
    listeners: list[Callable[[str, dict], None]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> EventRouter:
        session = self.aws.session()
        self._events = self.aws.client("events", session)
        self._sqs = self.aws.client("sqs", session)
        self._states = self.aws.client("stepfunctions", session)
        self._sns = self.aws.client("sns", session)
        for index, rule in enumerate(self.stack.rules):
            if not rule.enabled:
                continue
            if rule.pattern is not None:
                queue_url = self._queue_for(index, rule)
                self._spawn(f"rule-{rule.logical_id}", self._drain, rule, queue_url)
            if rule.schedule is not None:
                period = schedule_period_seconds(rule.schedule)
                if period is None:
                    log.info("rule %s: %s is not timed locally", rule.name, rule.schedule)
                else:
                    self._spawn(f"schedule-{rule.logical_id}", self._tick, rule, period)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _spawn(self, name: str, target: Callable, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=name)
        thread.start()
        self._threads.append(thread)

    def _queue_for(self, index: int, rule: RuleSpec) -> str:
        queue = f"spotrun-local-rule-{index}"
        url = self._sqs.create_queue(QueueName=queue)["QueueUrl"]
        # moto reshapes an event for a target without an InputTransformer through a
        # default template that drops "account"; the whole-event placeholder keeps it all.
        whole_event = {"InputPathsMap": {}, "InputTemplate": "<aws.events.event.json>"}
        self._events.put_targets(
            Rule=rule.name,
            EventBusName=rule.event_bus,
            Targets=[
                {
                    "Id": "local-router",
                    "Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT_ID}:{queue}",
                    "InputTransformer": whole_event,
                }
            ],
        )
        return url

    # -- sources -----------------------------------------------------------------------

    def put_event(
        self,
        source: str,
        detail_type: str,
        detail: Mapping[str, Any],
        resources: list[str] | None = None,
    ) -> None:
        """Emit an event to the default bus, as an AWS service would."""
        for listener in self.listeners:
            listener(detail_type, dict(detail))
        answer = self._events.put_events(
            Entries=[
                {
                    "Source": source,
                    "DetailType": detail_type,
                    "Detail": json.dumps(detail),
                    "Resources": resources or [],
                }
            ]
        )
        if answer.get("FailedEntryCount"):
            log.warning("put_events failed: %s", answer["Entries"])

    def fire_schedule(self, rule_name_or_logical_id: str) -> None:
        """Deliver a "Scheduled Event" of a schedule rule now."""
        for rule in self.stack.rules:
            if rule.schedule and rule_name_or_logical_id in (rule.name, rule.logical_id):
                self._deliver(rule, self._scheduled_event(rule))
                return
        raise KeyError(f"no schedule rule {rule_name_or_logical_id!r}")

    def _scheduled_event(self, rule: RuleSpec) -> dict[str, Any]:
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": ACCOUNT_ID,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "region": REGION,
            "resources": [f"arn:aws:events:{REGION}:{ACCOUNT_ID}:rule/{rule.name}"],
            "detail": {},
        }

    def _tick(self, rule: RuleSpec, period: float) -> None:
        while not self._stop.wait(period * self.schedule_scale):
            self._deliver(rule, self._scheduled_event(rule))

    def _drain(self, rule: RuleSpec, queue_url: str) -> None:
        while not self._stop.is_set():
            try:
                messages = self._sqs.receive_message(
                    QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1
                ).get("Messages", [])
            except Exception as error:  # the server is going away at shutdown
                if not self._stop.is_set():
                    log.warning("rule %s: receive failed: %s", rule.name, error)
                    time.sleep(0.5)
                continue
            for message in messages:
                event = json.loads(message["Body"])
                event.pop("ingestion-time", None)  # moto's bookkeeping, not part of an event
                self._deliver(rule, event)
                self._sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])

    # -- targets -----------------------------------------------------------------------

    def _deliver(self, rule: RuleSpec, event: Mapping[str, Any]) -> None:
        for target in rule.targets:
            payload = shape_input(target, event)
            service = target.arn.split(":")[2]
            self.deliveries.append(
                Delivery(rule.name, str(event.get("detail-type")), target.arn, time.time())
            )
            log.debug("rule %s -> %s: %s", rule.name, target.arn, event.get("detail-type"))
            try:
                if service == "lambda":
                    self.pool.invoke_async(target.arn, payload)
                elif service == "states":
                    self._states.start_execution(
                        stateMachineArn=target.arn, input=json.dumps(payload)
                    )
                elif service == "sqs":
                    name = target.arn.rsplit(":", 1)[-1]
                    url = self._sqs.get_queue_url(QueueName=name)["QueueUrl"]
                    self._sqs.send_message(QueueUrl=url, MessageBody=json.dumps(payload))
                elif service == "sns":
                    self._sns.publish(TopicArn=target.arn, Message=json.dumps(payload))
                else:
                    log.warning(
                        "rule %s: target %s is not delivered locally", rule.name, target.arn
                    )
            except Exception as error:  # one broken target must not stop the others
                log.warning("rule %s: delivery to %s failed: %s", rule.name, target.arn, error)
