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
without its body). Retries: 429 and 5xx answers and connection errors are retried with exponential backoff
(``backoff_seconds`` x 2^n, honouring ``Retry-After``) up to ``max_attempts`` tries in all
(urllib3's ``Retry``: no retry loop of our own); a 4xx other than 429, or the last failed try,
makes every record of the batch a dead letter (``quarantine/part-delivery-*``, stage
``delivery``), never a silent drop. Every try carries the headers signed for the first one: a
receiver that checks the timestamp (:func:`verify`, 300 s) refuses a retry sent after a longer
wait (a long ``Retry-After``); re-signing each try needs a retry loop of our own (not done).
Batches are cut per bundle, which is also the retry unit of the runner.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass

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
    # The environment variable holding the HMAC secret (unsigned requests if unset).
    secret_env: str | None = None

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError("url: an http:// or https:// URL")
        if self.batch_size < 1 or self.max_attempts < 1:
            raise ValueError("batch_size and max_attempts: at least 1")
        if self.backoff_seconds < 0 or self.timeout_seconds <= 0:
            raise ValueError("backoff_seconds >= 0 and timeout_seconds > 0")


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
        from requests.adapters import HTTPAdapter
        from urllib3.util.retry import Retry

        c = self._config
        retry = Retry(
            total=c.max_attempts - 1,
            connect=c.max_attempts - 1,
            read=c.max_attempts - 1,
            status=c.max_attempts - 1,
            backoff_factor=c.backoff_seconds,
            status_forcelist=_RETRIED,
            allowed_methods=None,  # POST too: the Idempotency-Key makes a retry safe
            respect_retry_after_header=True,
            raise_on_status=False,
        )
        self._session = requests.Session()
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))
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
        headers = {"Content-Type": "application/json", "Idempotency-Key": key}
        if self._secret is not None:
            ts = str(int(time.time()))
            headers[TIMESTAMP] = ts
            headers[SIGNATURE] = sign(self._secret, ts, body)
        error = None
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
            if not 200 <= r.status_code < 300:
                error = f"HTTP {r.status_code} after retries"
        except Exception as e:  # connection refused/reset after the last retry
            error = f"{type(e).__name__}: {e}"
        if error is None:
            self._delivered.inc(len(batch))
            return
        self._failed.inc(len(batch))
        for record in batch:
            yield dead_letter(record, ValueError(f"webhook delivery failed: {error}"))

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
