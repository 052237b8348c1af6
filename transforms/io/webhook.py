"""Webhooks as a destination: delivery records POSTed in batches, signed, retried, dead-lettered.

Each request is ``POST <url>`` with ``Content-Type: application/json`` and the body
``{"batch": [<Segment event>, ...]}`` (at most ``batch_size`` events: the destination's PII
policy already applied), plus:

- ``X-CDI-Timestamp``: seconds since the epoch when the request was signed;
- ``X-CDI-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`` with the secret from the
  environment variable ``secret_env`` (the receiver recomputes it and rejects stale timestamps:
  :func:`verify` is the reference);
- ``Idempotency-Key``: a hash of the batch's message ids, the same on every retry of the batch.

Redirects are not followed (a 3xx is a failure: requests would re-send the POST as a GET
without its body). Retries: 429 and 5xx answers and connection errors are retried up to
``max_attempts`` tries in all, after ``backoff_seconds`` x 2^(n-1) before the n-th retry, or
the answer's ``Retry-After`` (seconds or an HTTP date) when that is longer, at most
``max_wait_seconds`` (:func:`retry_wait`); a 4xx other than 429, or the last failed try, makes
every record of the batch a dead letter (``quarantine/part-delivery-*``, stage ``delivery``),
never a silent drop. Each try is signed when it is sent, so a retry after a long wait still
passes the receiver's freshness check (:func:`verify`, 300 s). The retry loop is ours, not
urllib3's ``Retry`` (which the requests adapter offers): that one re-sends the prepared
request, headers signed for the first try included, and retries the first time at once.
Batches are cut per bundle, which is also the retry unit of the runner.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import apache_beam as beam
import orjson
from apache_beam.metrics import Metrics

SIGNATURE, TIMESTAMP = "X-CDI-Signature", "X-CDI-Timestamp"


# Retried: too many requests and every server error (a 501 or a proxy's 520 too: the receiver
# may answer differently on the next try; a 4xx other than 429 is the request's fault).
_RETRIED = (429, *range(500, 600))


@dataclass(frozen=True)
class WebhookConfig:
    """``consent.destinations.<name>.delivery`` with ``type: webhook``."""

    url: str
    batch_size: int = 100
    max_attempts: int = 5
    backoff_seconds: float = 0.5
    timeout_seconds: float = 10.0
    # The longest wait before a retry, whatever Retry-After asks: a bundle is not held longer.
    max_wait_seconds: float = 60.0
    # The environment variable holding the HMAC secret (unsigned requests if unset).
    secret_env: str | None = None

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: an http:// or https:// URL")
        if self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("batch_size and max_attempts: at least 1")
        if self.backoff_seconds < 0 or self.timeout_seconds <= 0:
            raise ValueError("backoff_seconds >= 0 and timeout_seconds > 0")
        if self.max_wait_seconds < 0:
            raise ValueError("max_wait_seconds >= 0")


def retry_wait(
    config: WebhookConfig, tries: int, status: int | None, retry_after: str | None, now: float
) -> float | None:
    """Seconds to wait before the next try, after ``tries`` tries of which the last was answered
    ``status`` (None: no answer, a connection error or timeout) with the ``Retry-After`` header
    ``retry_after``; None when the batch is not tried again."""
    if tries >= config.max_attempts or (status is not None and status not in _RETRIED):
        return None
    wait = config.backoff_seconds * 2 ** (tries - 1)
    asked = _retry_after_seconds(retry_after, now)
    if asked is not None:
        wait = max(wait, asked)
    return min(wait, config.max_wait_seconds)


def _retry_after_seconds(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date (RFC 9110 10.2.3);
    None when absent or unreadable (the backoff applies)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT
        return None
    return max(when.timestamp() - now, 0.0)


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "v1=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, headers: dict, body: bytes, now: float, tolerance: float = 300) -> bool:
    """What a receiver checks: the signature over timestamp and body, and a fresh timestamp."""
    ts = headers.get(TIMESTAMP, "")
    given = headers.get(SIGNATURE, "")
    if not ts.isdigit() or abs(now - int(ts)) > tolerance:
        return False
    return hmac.compare_digest(given.encode("utf-8"), sign(secret, ts, body).encode())


def batch_body(records: list[dict]) -> tuple[bytes, str]:
    """``(body, idempotency key)`` of one batch."""
    events = [r["event"] for r in records]
    ids = "\x1f".join(str(e.get("messageId", "")) for e in events if isinstance(e, dict))
    return orjson.dumps({"batch": events}), hashlib.sha256(ids.encode()).hexdigest()[:32]


class _PostFn(beam.DoFn):
    def __init__(self, config: WebhookConfig):
        self._config = config
        self._delivered = Metrics.counter("cdi", "webhook.delivered")
        self._failed = Metrics.counter("cdi", "webhook.delivery_failed")

    def setup(self):
        import requests

        c = self._config
        self._session = requests.Session()  # no adapter retries: _post retries, re-signing
        secret = os.environ.get(c.secret_env) if c.secret_env else None
        if c.secret_env and not secret:  # never send unsigned what the receiver expects signed
            raise RuntimeError(f"webhook: the secret variable {c.secret_env} is not set")
        self._secret = secret.encode() if secret else None

    def start_bundle(self):
        self._batch: list[dict] = []

    def process(self, records):
        self._batch.extend(records if isinstance(records, list) else [records])
        while len(self._batch) >= self._config.batch_size:
            batch = self._batch[: self._config.batch_size]
            self._batch = self._batch[self._config.batch_size :]
            yield from self._post(batch)

    def finish_bundle(self):
        from transforms.dead_letter import at_bundle_end

        if self._batch:
            yield from map(at_bundle_end, self._post(self._batch))
            self._batch = []

    def _post(self, batch: list[dict]):
        from transforms.dead_letter import dead_letter

        body, key = batch_body(batch)
        tries = 0
        while True:
            tries += 1
            status, retry_after, error = self._try(body, key)
            if error is None:
                self._delivered.inc(len(batch))
                return
            wait = retry_wait(self._config, tries, status, retry_after, time.time())
            if wait is None:
                break
            time.sleep(wait)
        error = f"{error} after {tries} {'try' if tries == 1 else 'tries'}"
        self._failed.inc(len(batch))
        for record in batch:
            yield dead_letter(record, ValueError(f"webhook delivery failed: {error}"))

    def _try(self, body: bytes, key: str) -> tuple[int | None, str | None, str | None]:
        """One POST, signed now: ``(status or None, Retry-After, error or None)``."""
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        if self._secret is not None:
            ts = str(int(time.time()))
            headers[TIMESTAMP] = ts
            headers[SIGNATURE] = sign(self._secret, ts, body)
        try:
            # No redirects: requests would re-send a 301/302/303 as a GET without the body,
            # and a 200 on that GET would count the batch as delivered.
            r = self._session.post(
                self._config.url,
                data=body,
                headers=headers,
                timeout=self._config.timeout_seconds,
                allow_redirects=False,
            )
        except Exception as e:  # connection refused or reset, a timeout: retried
            return None, None, f"{type(e).__name__}: {e}"
        if 200 <= r.status_code < 300:
            return r.status_code, None, None
        return r.status_code, r.headers.get("Retry-After"), f"HTTP {r.status_code}"

    def teardown(self):
        session = getattr(self, "_session", None)
        if session is not None:
            session.close()


class DeliverToWebhook(beam.PTransform):
    """Delivery record lists in; dead letters (records of batches that failed) out."""

    def __init__(self, config: WebhookConfig):
        super().__init__()
        self._config = config

    def expand(self, records):
        from transforms.dead_letter import failures_of

        return failures_of(records, "Post", _PostFn(self._config))
