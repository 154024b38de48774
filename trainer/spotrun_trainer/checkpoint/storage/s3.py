"""Checkpoint storage under an S3 prefix (the mirror), through an injected boto3 client."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from botocore.exceptions import ClientError

from ..errors import ChunkMissingError, CorruptCheckpointError
from ..manifest import chunk_key, manifest_key
from .base import Store

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _is_missing(error: ClientError) -> bool:
    return str(error.response.get("Error", {}).get("Code")) in _NOT_FOUND


class S3Store(Store):
    """An S3 prefix. A PUT is durable and atomic when it returns, so ordering is the whole
    protocol: the checkpointer uploads chunks, then the manifest, then LATEST."""

    location = "s3"
    default_codec = "planes"  # bytes over the network cost more than these cores' time
    prefers_listing = True  # a LIST returns 1,000 keys; a HEAD per chunk is a round trip

    def __init__(self, uri: str, *, s3_client: Any) -> None:
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3:// URI: {uri!r}")
        self.bucket = parsed.netloc
        prefix = parsed.path.lstrip("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self.client = s3_client
        self.uri = f"s3://{self.bucket}/{self.prefix}"

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def describe(self) -> str:
        return self.uri

    def _key(self, relative: str) -> str:
        return self.prefix + relative

    def _get(self, relative: str, **kwargs: Any) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=self._key(relative), **kwargs)
        return response["Body"].read()

    def _list(self, relative: str) -> dict[str, int]:
        keys: dict[str, int] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(relative)):
            for item in page.get("Contents", ()):
                keys[item["Key"][len(self.prefix) :]] = int(item["Size"])
        return keys

    # chunks -------------------------------------------------------------------------

    def chunk_size(self, digest: str) -> int | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(chunk_key(digest)))
        except ClientError as error:
            if _is_missing(error):
                return None
            raise
        return int(head["ContentLength"])

    def put_chunk(self, digest: str, parts: Sequence[Any]) -> int:
        body = b"".join(memoryview(p).cast("B") for p in parts)
        self.client.put_object(Bucket=self.bucket, Key=self._key(chunk_key(digest)), Body=body)
        return len(body)

    def get_chunk(self, digest: str) -> bytes:
        try:
            return self._get(chunk_key(digest))
        except ClientError as error:
            if _is_missing(error):
                raise ChunkMissingError(f"chunk {digest} missing from {self.uri}") from error
            raise

    def get_chunk_header(self, digest: str, size: int) -> bytes:
        try:
            return self._get(chunk_key(digest), Range=f"bytes=0-{size - 1}")
        except ClientError as error:
            if _is_missing(error):
                raise ChunkMissingError(f"chunk {digest} missing from {self.uri}") from error
            raise

    def list_chunks(self) -> dict[str, int]:
        return {key.rsplit("/", 1)[-1]: size for key, size in self._list("chunks/").items()}

    def delete_chunks(self, digests: Sequence[str]) -> None:
        keys = [{"Key": self._key(chunk_key(d))} for d in digests]
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000], "Quiet": True}
            )

    # manifests and pointer ----------------------------------------------------------

    def put_manifest(self, step: int, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(manifest_key(step)), Body=data)

    def get_manifest(self, step: int) -> bytes:
        try:
            return self._get(manifest_key(step))
        except ClientError as error:
            if _is_missing(error):
                raise CorruptCheckpointError(f"manifest of step {step} missing") from error
            raise

    def list_manifests(self) -> list[int]:
        steps = []
        for key in self._list("manifests/"):
            stem, dot, ext = key.rsplit("/", 1)[-1].partition(".")
            if dot and ext == "json" and stem.isdigit():
                steps.append(int(stem))
        return sorted(steps)

    def delete_manifest(self, step: int) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(manifest_key(step)))

    def replace_pointer(self, data: bytes) -> None:
        # A single PUT replaces an object atomically: readers get the old or the new one.
        self.client.put_object(Bucket=self.bucket, Key=self._key("LATEST"), Body=data)

    def get_pointer(self) -> bytes | None:
        try:
            return self._get("LATEST")
        except ClientError as error:
            if _is_missing(error):
                return None
            raise
