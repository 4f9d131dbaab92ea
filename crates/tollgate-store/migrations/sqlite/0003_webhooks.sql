-- Billing webhooks: endpoints, their signing secrets, and the deliveries cut for them.
--
-- An endpoint's `cursor` is the usage-event `seq` up to which batches were cut: a batch
-- is inserted and the cursor advanced in one transaction, so an event is in exactly one
-- delivery of each endpoint. A delivery keeps the exact body bytes it was first sent
-- with, so every retry (and every restart) sends the same bytes under the same id.

CREATE TABLE webhook_endpoints (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    url          TEXT    NOT NULL,
    description  TEXT,
    -- usage_events.seq up to which batches were cut (events created before the endpoint
    -- existed are never sent to it).
    cursor       INTEGER NOT NULL,
    created_at   INTEGER NOT NULL,
    deleted_at   INTEGER
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id, seq);

CREATE TABLE webhook_secrets (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id  TEXT    NOT NULL REFERENCES webhook_endpoints (id),
    -- The `whsec_...` text sealed with the master key.
    ciphertext  BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    -- NULL while the secret is the current one; set by a rotation.
    expires_at  INTEGER
);
CREATE INDEX webhook_secrets_webhook ON webhook_secrets (webhook_id, seq);

CREATE TABLE webhook_deliveries (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    webhook_id       TEXT    NOT NULL REFERENCES webhook_endpoints (id),
    body             BLOB    NOT NULL,
    event_count      INTEGER NOT NULL,
    first_event_seq  INTEGER NOT NULL,
    last_event_seq   INTEGER NOT NULL,
    status           TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    -- Every attempt ever made, manual retries included.
    attempts         INTEGER NOT NULL DEFAULT 0,
    -- Failed attempts since the delivery was cut or last reset: the step of the retry
    -- schedule the next failure waits for.
    retry_step       INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,
    last_attempt_at  INTEGER,
    last_http_status INTEGER,
    last_error       TEXT,
    -- An instance sending this delivery holds it until this time, so two instances
    -- never send the same batch at once.
    lease_until      INTEGER,
    created_at       INTEGER NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, seq);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
