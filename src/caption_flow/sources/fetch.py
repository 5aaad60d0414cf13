"""Image downloads for datasets that hold URLs (LAION-style), on the worker.

Every attempt has a deadline for the whole download, not only per socket read, so a server
that trickles bytes cannot hold a worker. Timeouts, 408/429 and 5xx are retried with back-off;
other failures (404, 403, DNS, too large, not http) fail the item at once with the reason.
A failed item is reported as failed, never re-queued: a dead URL stays dead.
"""

from __future__ import annotations

import http.client
import logging
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from caption_flow.images.decode import error_reason

logger = logging.getLogger(__name__)

USER_AGENT = "caption-flow/0.1 (+https://pypi.org/project/caption-flow/)"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_READ_PIECE = 256 * 1024


@dataclass(frozen=True)
class FetchPolicy:
    timeout: float = 20.0
    retries: int = 2
    max_bytes: int = 64 * 1024 * 1024
    backoff: float = 0.5


class _Permanent(Exception):
    pass


def fetch_url(url: str, policy: FetchPolicy) -> tuple[bytes | None, str | None]:
    """(data, None) or (None, reason). Never raises for a bad URL."""
    if not url.startswith(("http://", "https://")):
        return None, f"not an http(s) url: {url[:200]!r}"
    last = "no attempt"
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(policy.backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
        try:
            return _get(url, policy), None
        except _Permanent as exc:
            return None, str(exc)
        except urllib.error.HTTPError as exc:
            if exc.code not in _RETRY_STATUS:
                return None, f"HTTP {exc.code} {exc.reason}"
            last = f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            last = f"cannot connect: {exc.reason}"
        except TimeoutError:
            last = f"timed out after {policy.timeout:g}s"
        except (http.client.HTTPException, ConnectionError, OSError) as exc:
            last = error_reason(exc)
        logger.debug("download of %s failed (%s), attempt %d", url, last, attempt + 1)
    return None, f"{last} ({policy.retries + 1} attempts)"


def _get(url: str, policy: FetchPolicy) -> bytes:
    deadline = time.monotonic() + policy.timeout
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=policy.timeout) as response:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise _Permanent(f"too large: {int(length)} bytes (limit {policy.max_bytes})")
        pieces: list[bytes] = []
        total = 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError
            piece = response.read(_READ_PIECE)
            if not piece:
                break
            total += len(piece)
            if total > policy.max_bytes:
                raise _Permanent(f"too large: over {policy.max_bytes} bytes")
            pieces.append(piece)
    return b"".join(pieces)
