#!/usr/bin/env python3
"""A Tollgate billing webhook receiver, standard library only.

It verifies BOTH signatures Tollgate sends, over the raw body bytes:
  webhook-signature:   v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>
                       (several, space-separated, while a secret is being rotated)
  X-Baseten-Signature: v1=<hex HMAC-SHA256(key, body)>
                       (several, comma-separated, while a secret is being rotated)
where key = base64-decode(the part of the endpoint's secret after "whsec_"). It refuses
timestamps more than 5 minutes away from now, and counts each usage event once, by its
idempotencyKey, however often it is delivered.

Run:  WEBHOOK_SECRET=whsec_... PORT=8000 python3 receiver.py
It prints "listening on HOST:PORT", then one JSON line per newly accepted event.
See docs/webhooks-receivers.md.
"""

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE_SECONDS = 5 * 60
MAX_BODY_BYTES = 10 * 1024 * 1024


def secret_key(secret):
    """The HMAC key: the bytes the base64 after `whsec_` decodes to."""
    if not secret.startswith("whsec_"):
        raise ValueError("WEBHOOK_SECRET must start with whsec_")
    return base64.b64decode(secret[len("whsec_"):], validate=True)


def same(a, b):
    """Constant-time comparison of two header strings."""
    return hmac.compare_digest(a.encode(), b.encode("utf-8", "replace"))


def verify(key, headers, body, now=None):
    """None when the delivery is authentic and fresh, else the reason to refuse it."""
    msg_id = headers.get("webhook-id")
    timestamp = headers.get("webhook-timestamp")
    standard = headers.get("webhook-signature")
    legacy = headers.get("x-baseten-signature")
    if not (msg_id and timestamp and standard and legacy):
        return "missing signature headers"
    try:
        sent_at = int(timestamp)
    except ValueError:
        return "malformed webhook-timestamp"
    now = int(time.time()) if now is None else now
    if abs(now - sent_at) > TOLERANCE_SECONDS:
        return "timestamp outside the 5-minute tolerance"

    # Standard Webhooks: HMAC over "id.timestamp.body", base64, one entry per key.
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    offered = [e.split(",", 1)[1] for e in standard.split() if e.startswith("v1,")]
    if not any(same(expected, sig) for sig in offered):
        return "webhook-signature does not match"

    # Reference-API header: HMAC over the body alone, hex.
    expected = hmac.new(key, body, hashlib.sha256).hexdigest()
    offered = [e.strip()[3:] for e in legacy.split(",") if e.strip().startswith("v1=")]
    if not any(same(expected, sig) for sig in offered):
        return "X-Baseten-Signature does not match"
    return None


class Ledger:
    """Events already counted. In production, a table with a unique idempotency key,
    written in the same transaction as the billing records."""

    def __init__(self):
        self._seen = set()
        self._lock = threading.Lock()

    def add(self, key):
        """True the first time a key is seen."""
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


class Receiver(BaseHTTPRequestHandler):
    key = b""
    ledger = Ledger()

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_BODY_BYTES:
            return self.answer(413, "body too large")
        body = self.rfile.read(length)  # the raw bytes: verify BEFORE parsing
        headers = {name.lower(): value for name, value in self.headers.items()}
        refusal = verify(self.key, headers, body)
        if refusal:
            log({"rejected": refusal})
            return self.answer(401, refusal)
        try:
            payload = json.loads(body)
            if not isinstance(payload, dict):
                raise TypeError("not an object")
            # Acknowledge types this receiver does not know, and do nothing with them.
            is_usage = payload.get("type") == "API_BILLING_USAGE"
            records = [summary(e) for e in payload["data"]["events"]] if is_usage else []
        except (ValueError, KeyError, TypeError):
            return self.answer(400, "not a usage payload")
        for record in records:
            if self.ledger.add(record["accepted"]):
                log(record)
            else:
                log({"duplicate": record["accepted"]})
        # 2xx for duplicates too: the sender must stop retrying what we already have.
        self.answer(200, "ok")

    def answer(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass  # stdout carries one JSON line per decision; no access log


def summary(event):
    """What this example records of one usage event (a real receiver stores it all)."""
    return {
        "accepted": event["idempotencyKey"],
        "requestId": event["requestId"],
        "externalEntityId": event["externalEntityId"],
        "modelSlug": event["modelSlug"],
        "inputTokens": event["tokens"]["inputTokens"],
        "outputTokens": event["tokens"]["outputTokens"],
    }


def log(record):
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def main():
    Receiver.key = secret_key(os.environ["WEBHOOK_SECRET"])
    host = os.environ.get("HOST", "127.0.0.1")
    server = ThreadingHTTPServer((host, int(os.environ.get("PORT", "8000"))), Receiver)
    sys.stdout.write("listening on %s:%d\n" % server.server_address[:2])
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
