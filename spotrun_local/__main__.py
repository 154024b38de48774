"""``python -m spotrun_local``: the demo, a long-running local cloud, and job submission to it."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from spotrun_local.demo import DemoOptions, parse_pool, parse_schedule, run_demo

STATE_FILE = Path("out/local-cloud.json")  # where `up` says how to reach it, for `submit`


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spotrun_local",
        description="spotrun on this machine: moto as AWS, template.yaml deployed on it, "
        "instances as local trainer processes, spot interruptions on demand.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the cloud does")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the example job through interruptions, live")
    demo.add_argument("--interruptions", type=int, default=3, help="spread over the run (3)")
    demo.add_argument(
        "--schedule",
        help="explicit faults: interrupt@step=60,kill@step=120,"
        "rebalance@t=20 (replaces --interruptions)",
    )
    demo.add_argument(
        "--random-rate",
        type=float,
        default=0.0,
        help="random interruptions per minute of training, on top of --interruptions",
    )
    demo.add_argument("--seed", type=int, default=0, help="chaos and training seed")
    demo.add_argument(
        "--notice-seconds", type=float, default=6.0, help="spot notice period (120 on AWS)"
    )
    demo.add_argument("--steps", type=int, default=200, help="training steps of the example")
    demo.add_argument("--step-sleep", type=float, default=0.05, help="seconds per step (pacing)")
    demo.add_argument("--spec", type=Path, help="a job spec JSON file instead of the example")
    demo.add_argument(
        "--capacity-error",
        action="append",
        default=[],
        metavar="TYPE@AZ",
        help="refuse spot capacity in this pool (repeatable)",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="for summary.json, timeline.png"
    )
    demo.add_argument("--template", type=Path, help="another template.yaml")
    demo.add_argument("--root", type=Path, help="keep the cloud's files here (logs, volumes)")

    up = commands.add_parser("up", help="keep a local cloud running for your own jobs")
    up.add_argument("--notice-seconds", type=float, default=120.0)
    up.add_argument("--api-port", type=int, default=0)
    up.add_argument("--template", type=Path)

    submit = commands.add_parser("submit", help="submit a job file to a running `up`")
    submit.add_argument("file", type=Path)
    submit.add_argument("--via", choices=("api", "s3"), default="api")
    submit.add_argument("--state", type=Path, default=STATE_FILE, help="written by `up`")
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(message)s",
    )
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
    if arguments.command == "demo":
        return _demo(arguments)
    if arguments.command == "up":
        return _up(arguments)
    return _submit(arguments)


def _demo(arguments: argparse.Namespace) -> int:
    options = DemoOptions(
        interruptions=arguments.interruptions,
        seed=arguments.seed,
        notice_seconds=arguments.notice_seconds,
        steps=arguments.steps,
        step_sleep=arguments.step_sleep,
        spec=json.loads(arguments.spec.read_text()) if arguments.spec else None,
        faults=parse_schedule(arguments.schedule) if arguments.schedule else None,
        random_rate_per_minute=arguments.random_rate,
        capacity_faults=[parse_pool(pool) for pool in arguments.capacity_error],
        out=arguments.out,
        template=arguments.template,
        root=arguments.root,
    )
    summary = run_demo(options)
    clean = not any(summary["leaked"].values())
    return 0 if summary["status"] == "SUCCEEDED" and clean else 1


def _up(arguments: argparse.Namespace) -> int:
    from spotrun_local.cloud import CloudConfig, LocalCloud

    config = CloudConfig(notice_seconds=arguments.notice_seconds, api_port=arguments.api_port)
    if arguments.template:
        config.template = arguments.template
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    with LocalCloud(config) as cloud:
        info = cloud.describe()
        STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
        STATE_FILE.write_text(json.dumps(info, indent=2) + "\n")
        print(f"API           {info['api_url']}  (POST /jobs, GET /jobs/{{job_id}}, DELETE ...)")
        print(f"AWS endpoint  {info['endpoint_url']}  (export AWS_ENDPOINT_URL=...)")
        print(f"bucket        {info['bucket']}  (drop jobs/<name>.json to submit)")
        print(f"state machine {info['state_machine_arn']}")
        print(f"files         {info['root']}")
        print("submit with   python -m spotrun_local submit FILE [--via s3]   (Ctrl-C stops)")
        sys.stdout.flush()
        try:
            while not stopping.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            # A later `submit` must not aim at a cloud that is gone.
            STATE_FILE.unlink(missing_ok=True)
    return 0


def _submit(arguments: argparse.Namespace) -> int:
    if not arguments.state.exists():
        print(f"{arguments.state} not found: start `python -m spotrun_local up` first")
        return 2
    info = json.loads(arguments.state.read_text())
    body = arguments.file.read_bytes()
    if arguments.via == "api":
        from spotrun_local.client import ApiClient

        response = ApiClient(info["api_url"]).request("POST", "/jobs", body)
        print(response.status, json.dumps(response.body, indent=2))
        return 0 if response.status < 300 else 1
    import boto3

    from spotrun_local.aws import FAKE_CREDENTIALS, REGION

    session = boto3.Session(
        region_name=REGION,
        aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3 = session.client("s3", endpoint_url=info["endpoint_url"])
    key = f"jobs/{arguments.file.name}"
    put = s3.put_object(Bucket=info["bucket"], Key=key, Body=body)
    print(f"uploaded s3://{info['bucket']}/{key}")
    # The S3 event reaches the submission function asynchronously: wait for its record.
    from boto3.dynamodb.conditions import Attr

    table = session.resource("dynamodb", endpoint_url=info["endpoint_url"]).Table(
        info["outputs"]["JobsTableName"]
    )
    # The record's source names the object's version (the bucket is versioned), else
    # its ETag (the event's, without quotes).
    if put.get("VersionId"):
        wanted = Attr("source.key").eq(key) & Attr("source.version_id").eq(put["VersionId"])
    else:
        wanted = Attr("source.key").eq(key) & Attr("source.etag").eq(put["ETag"].strip('"'))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = table.scan(FilterExpression=wanted).get("Items", [])
        if items:
            job = items[0]
            print(
                f"job {job['job_id']}: {job['status']}"
                + (f": {job['reason']}" if job.get("reason") else "")
            )
            return 1 if job["status"] == "REJECTED" else 0
        time.sleep(0.5)
    print("no job record yet (the S3 event may still be on its way)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
