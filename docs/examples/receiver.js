#!/usr/bin/env node
// A Tollgate billing webhook receiver, Node built-ins only (`http`, `crypto`).
//
// It verifies BOTH signatures Tollgate sends, over the raw body bytes:
//   webhook-signature:   v1,<base64 HMAC-SHA256(key, "{webhook-id}.{webhook-timestamp}.{body}")>
//                        (several, space-separated, while a secret is being rotated)
//   X-Baseten-Signature: v1=<hex HMAC-SHA256(key, body)>
//                        (several, comma-separated, while a secret is being rotated)
// where key = base64-decode(the part of the endpoint's secret after "whsec_"). It refuses
// timestamps more than 5 minutes away from now, and counts each usage event once, by its
// idempotencyKey, however often it is delivered.
//
// Run:  WEBHOOK_SECRET=whsec_... PORT=8000 node receiver.js
// It prints "listening on HOST:PORT", then one JSON line per newly accepted event.
// See docs/webhooks-receivers.md.
'use strict';

const crypto = require('crypto');
const http = require('http');

const TOLERANCE_SECONDS = 5 * 60;
const MAX_BODY_BYTES = 10 * 1024 * 1024;

/** The HMAC key: the bytes the base64 after `whsec_` decodes to. */
function secretKey(secret) {
  if (!secret || !secret.startsWith('whsec_')) {
    throw new Error('WEBHOOK_SECRET must start with whsec_');
  }
  return Buffer.from(secret.slice('whsec_'.length), 'base64');
}

/** Constant-time comparison of two strings (false when lengths differ). */
function same(a, b) {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && crypto.timingSafeEqual(x, y);
}

/** null when the delivery is authentic and fresh, else the reason to refuse it. */
function verify(key, headers, body, now = Math.floor(Date.now() / 1000)) {
  const id = headers['webhook-id'];
  const timestamp = headers['webhook-timestamp'];
  const standard = headers['webhook-signature'];
  const legacy = headers['x-baseten-signature'];
  if (!id || !timestamp || !standard || !legacy) return 'missing signature headers';
  if (!/^[0-9]+$/.test(timestamp)) return 'malformed webhook-timestamp';
  if (Math.abs(now - Number(timestamp)) > TOLERANCE_SECONDS) {
    return 'timestamp outside the 5-minute tolerance';
  }

  // Standard Webhooks: HMAC over "id.timestamp.body", base64, one entry per key.
  let expected = crypto.createHmac('sha256', key)
    .update(`${id}.${timestamp}.`)
    .update(body)
    .digest('base64');
  let offered = standard.split(/\s+/).filter((e) => e.startsWith('v1,')).map((e) => e.slice(3));
  if (!offered.some((sig) => same(expected, sig))) return 'webhook-signature does not match';

  // Reference-API header: HMAC over the body alone, hex.
  expected = crypto.createHmac('sha256', key).update(body).digest('hex');
  offered = legacy.split(',').map((e) => e.trim()).filter((e) => e.startsWith('v1=')).map((e) => e.slice(3));
  if (!offered.some((sig) => same(expected, sig))) return 'X-Baseten-Signature does not match';
  return null;
}

// Events already counted. In production, a table with a unique idempotency key, written
// in the same transaction as the billing records.
const seen = new Set();

/** What this example records of one usage event (a real receiver stores it all). */
function summary(event) {
  if (typeof event.idempotencyKey !== 'string') throw new TypeError('idempotencyKey');
  return {
    accepted: event.idempotencyKey,
    requestId: event.requestId,
    externalEntityId: event.externalEntityId,
    modelSlug: event.modelSlug,
    inputTokens: event.tokens.inputTokens,
    outputTokens: event.tokens.outputTokens,
  };
}

function log(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

function answer(res, status, text) {
  res.writeHead(status, { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

function handle(key, req, res, body) {
  const refusal = verify(key, req.headers, body); // the raw bytes: verify BEFORE parsing
  if (refusal) {
    log({ rejected: refusal });
    return answer(res, 401, refusal);
  }
  let records;
  try {
    const payload = JSON.parse(body.toString('utf8'));
    if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
      throw new TypeError('not an object');
    }
    // Acknowledge types this receiver does not know, and do nothing with them.
    records = payload.type === 'API_BILLING_USAGE' ? payload.data.events.map(summary) : [];
  } catch (e) {
    return answer(res, 400, 'not a usage payload');
  }
  for (const record of records) {
    if (seen.has(record.accepted)) {
      log({ duplicate: record.accepted });
    } else {
      seen.add(record.accepted);
      log(record);
    }
  }
  // 2xx for duplicates too: the sender must stop retrying what we already have.
  return answer(res, 200, 'ok');
}

function main() {
  const key = secretKey(process.env.WEBHOOK_SECRET);
  const server = http.createServer((req, res) => {
    if (req.method !== 'POST') return answer(res, 405, 'POST only');
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        answer(res, 413, 'body too large');
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (size <= MAX_BODY_BYTES) handle(key, req, res, Buffer.concat(chunks));
    });
  });
  const host = process.env.HOST || '127.0.0.1';
  server.listen(Number(process.env.PORT || 8000), host, () => {
    const { address, port } = server.address();
    process.stdout.write(`listening on ${address}:${port}\n`);
  });
}

main();
