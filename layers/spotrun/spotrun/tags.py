"""The tags spotrun puts on everything it creates; IAM conditions rely on them."""

from __future__ import annotations

from collections.abc import Mapping

JOB_ID = "spotrun:job-id"
ATTEMPT = "spotrun:attempt"
MANAGED = "spotrun:managed"
ROLE = "spotrun:role"  # "checkpoint" or "data" on volumes and snapshots

RESERVED_PREFIXES = ("spotrun:", "aws:")


def resource_tags(
    job_id: str,
    attempt: int | None = None,
    user_tags: Mapping[str, str] | None = None,
    **extra: str,
) -> dict[str, str]:
    """The full tag set for a resource of ``job_id``: user tags first, ours win."""
    tags: dict[str, str] = dict(user_tags or {})
    tags[MANAGED] = "true"
    tags[JOB_ID] = job_id
    if attempt is not None:
        tags[ATTEMPT] = str(attempt)
    tags.update(extra)
    return tags


def as_tag_list(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """EC2/SNS style ``[{"Key": ..., "Value": ...}]``."""
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def tag_specifications(resource_type: str, tags: Mapping[str, str]) -> list[dict]:
    """EC2 ``TagSpecifications`` for one resource type."""
    return [{"ResourceType": resource_type, "Tags": as_tag_list(tags)}]
