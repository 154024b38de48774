"""AWS clients for the functions: built once per container, shared by every invocation."""

from __future__ import annotations

import functools
import threading
from typing import Any

import boto3
from botocore.config import Config

# Standard retry mode backs off on throttling across every call a function makes;
# the endpoint comes from AWS_ENDPOINT_URL when set (the local cloud), as boto3 does.
_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5}, connect_timeout=5, read_timeout=30
)
# Creating clients from one session is not thread-safe; the local cloud runs
# handlers on several threads.
_LOCK = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    # One session for the process: its loader caches the parsed service models, which
    # are most of a client's creation cost (EC2's model alone is several MB of JSON).
    return boto3.session.Session()


@functools.cache
def client(service_name: str) -> Any:
    """The cached boto3 client for ``service_name`` (``"ec2"``, ``"stepfunctions"``, ...)."""
    with _LOCK:
        return _session().client(service_name, config=_CONFIG)


def reset() -> None:
    """Forget every cached client (tests, or after the environment changes).

    The session stays: it holds no endpoint or mock state, only parsed models and
    the credentials chain, so new clients are cheap.
    """
    client.cache_clear()
