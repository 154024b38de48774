"""A small IMDSv2 client: session token with a TTL, refreshed before expiry and on 401.

Standard library only, so the watcher adds no dependency and no import time.
"""

from __future__ import annotations

import os
import threading
import time
import urllib.error
import urllib.request

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENDPOINT_ENV = "SPOTRUN_IMDS_ENDPOINT"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


class IMDSError(Exception):
    """IMDS could not be reached or answered with an unexpected status."""


class IMDSClient:
    """Reads instance metadata with an IMDSv2 token.

    The token is renewed when less than ``refresh_margin`` of its TTL remains, and
    once more whenever IMDS answers 401 (a token can expire early, e.g. when the
    clock jumps or the local cloud restarts its IMDS).
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token_ttl_seconds: int = 21600,
        timeout_seconds: float = 2.0,
        refresh_margin: float = 0.2,
    ) -> None:
        self.endpoint = (endpoint or os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT).rstrip("/")
        self.token_ttl_seconds = int(token_ttl_seconds)
        self.timeout_seconds = timeout_seconds
        self._refresh_margin = refresh_margin
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()

    def get(self, path: str) -> str | None:
        """Return the text at ``latest/<path>``, or None when IMDS says 404."""
        for attempt in range(2):
            token = self._current_token(force=attempt > 0)
            request = urllib.request.Request(
                f"{self.endpoint}/latest/{path.lstrip('/')}", headers={TOKEN_HEADER: token}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    return response.read().decode("utf-8")
            except urllib.error.HTTPError as error:
                if error.code == 404:
                    return None
                if error.code == 401 and attempt == 0:
                    continue  # expired or revoked token: fetch a new one, ask again
                raise IMDSError(f"IMDS GET {path}: HTTP {error.code}") from error
            except (urllib.error.URLError, OSError) as error:
                raise IMDSError(f"IMDS GET {path}: {error}") from error
        raise IMDSError(f"IMDS GET {path}: still 401 after a new token")

    def _current_token(self, force: bool) -> str:
        with self._lock:
            margin = self.token_ttl_seconds * self._refresh_margin
            if force or self._token is None or time.monotonic() > self._token_expires - margin:
                self._token = self._fetch_token()
                self._token_expires = time.monotonic() + self.token_ttl_seconds
            return self._token

    def _fetch_token(self) -> str:
        request = urllib.request.Request(
            f"{self.endpoint}/latest/api/token",
            method="PUT",
            headers={TTL_HEADER: str(self.token_ttl_seconds)},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                return response.read().decode("utf-8").strip()
        except urllib.error.HTTPError as error:
            raise IMDSError(f"IMDS token PUT: HTTP {error.code}") from error
        except (urllib.error.URLError, OSError) as error:
            raise IMDSError(f"IMDS token PUT: {error}") from error
