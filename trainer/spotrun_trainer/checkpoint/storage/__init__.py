"""Storage backends of the checkpoint store: a local folder and an S3 prefix."""

from .base import Store
from .local import LocalStore
from .s3 import S3Store

__all__ = ["LocalStore", "S3Store", "Store"]
