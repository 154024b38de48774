"""Writing the final model to the ticket's ``output.model_uri`` (S3, or a local path)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``("bucket", "key")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise ValueError(f"s3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def write_model(model: Any, uri: str, *, s3_client: Any = None) -> str:
    """Write ``model`` (a file path, an ``nn.Module`` or a state dict) to ``uri``.

    Returns ``uri``. A module or mapping is written with ``torch.save`` of its state
    dict, the format users load with ``torch.load``.
    """
    with tempfile.TemporaryDirectory(prefix="spotrun-model-") as scratch:
        if isinstance(model, (str, os.PathLike)):
            source = Path(model)
            if not source.is_file():
                raise FileNotFoundError(f"model file {source} does not exist")
        else:
            state = model.state_dict() if hasattr(model, "state_dict") else model
            if not isinstance(state, Mapping):
                raise TypeError(f"cannot write a model of type {type(model).__name__}")
            source = Path(scratch) / "model.pt"
            torch.save(dict(state), source)
        if uri.startswith("s3://"):
            bucket, key = split_s3_uri(uri)
            if s3_client is None:
                import boto3

                s3_client = boto3.client("s3")
            s3_client.upload_file(str(source), bucket, key)
        else:
            target = Path(uri.removeprefix("file://"))
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            os.replace(partial, target)  # readers never see half a model
    return uri
