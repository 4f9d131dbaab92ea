-- Tollgate's PostgreSQL schema: the same tables, columns and uniqueness rules as the
-- SQLite schema (migrations/sqlite), so both stores pass one conformance suite.
--
-- Every listable table has `seq`, an identity column: it gives creation order and is the
-- keyset for paging (`WHERE seq > $n ORDER BY seq`); a value is never handed out twice.
-- Deletes are soft (`deleted_at` / `revoked_at`); timestamps are BIGINT milliseconds
-- since the epoch. Integers are BIGINT throughout so every column decodes as i64.

CREATE TABLE workspaces (
    seq         BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL CONSTRAINT workspaces_name_key UNIQUE,
    is_enabled  BOOLEAN NOT NULL DEFAULT TRUE,
    signing_key BYTEA,
    created_at  BIGINT  NOT NULL
);

CREATE TABLE management_keys (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    prefix       TEXT   NOT NULL CONSTRAINT management_keys_prefix_key UNIQUE,
    workspace_id TEXT   NOT NULL REFERENCES workspaces (id),
    hash         BYTEA  NOT NULL,
    name         TEXT,
    scope        TEXT   NOT NULL CHECK (scope IN ('manage', 'view')),
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);
CREATE INDEX management_keys_workspace ON management_keys (workspace_id, seq);
CREATE INDEX management_keys_hash ON management_keys (hash);

CREATE TABLE secrets (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT   NOT NULL UNIQUE,
    workspace_id TEXT   NOT NULL REFERENCES workspaces (id),
    name         TEXT   NOT NULL,
    ciphertext   BYTEA  NOT NULL,
    created_at   BIGINT NOT NULL,
    deleted_at   BIGINT
);
CREATE INDEX secrets_workspace ON secrets (workspace_id, seq);
-- A deleted secret's name may be taken again.
CREATE UNIQUE INDEX secrets_live_name ON secrets (workspace_id, name) WHERE deleted_at IS NULL;

CREATE TABLE endpoints (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT   NOT NULL UNIQUE,
    workspace_id TEXT   NOT NULL REFERENCES workspaces (id),
    slug         TEXT   NOT NULL,
    region       TEXT   NOT NULL,
    -- JSON array of tollgate_core::endpoint::Target, as text (read back verbatim).
    targets      TEXT   NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL,
    deleted_at   BIGINT
);
-- A deleted endpoint's slug may be taken again.
CREATE UNIQUE INDEX endpoints_live_slug ON endpoints (slug) WHERE deleted_at IS NULL;
CREATE INDEX endpoints_workspace ON endpoints (workspace_id, seq);

CREATE TABLE groups (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 TEXT   NOT NULL UNIQUE,
    workspace_id       TEXT   NOT NULL REFERENCES workspaces (id),
    name               TEXT,
    external_entity_id TEXT   NOT NULL,
    -- JSON array of tollgate_core::ModelAccess, as text.
    models             TEXT   NOT NULL,
    mode               TEXT   NOT NULL CHECK (mode IN ('INDEPENDENT', 'CASCADING')),
    parent_id          TEXT   REFERENCES groups (id),
    -- 1 for a root.
    depth              BIGINT NOT NULL CHECK (depth BETWEEN 1 AND 5),
    created_at         BIGINT NOT NULL,
    deleted_at         BIGINT
);
-- A deleted group's external_entity_id may be taken again.
CREATE UNIQUE INDEX groups_live_external_id
    ON groups (workspace_id, external_entity_id) WHERE deleted_at IS NULL;
CREATE INDEX groups_workspace ON groups (workspace_id, seq);
CREATE INDEX groups_parent ON groups (parent_id, seq);

CREATE TABLE api_keys (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Unique forever: a revoked key's prefix is never handed out again.
    prefix     TEXT   NOT NULL CONSTRAINT api_keys_prefix_key UNIQUE,
    group_id   TEXT   NOT NULL REFERENCES groups (id),
    hash       BYTEA  NOT NULL,
    name       TEXT,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_group ON api_keys (group_id, seq);

-- No foreign keys here: a billing record is never refused. Inserts are serialized by an
-- advisory lock (see `postgres.rs`) so `seq` values become visible in increasing order.
CREATE TABLE usage_events (
    seq                 BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key     TEXT    NOT NULL UNIQUE,
    timestamp           BIGINT  NOT NULL,
    request_id          TEXT    NOT NULL,
    request_metadata    TEXT,
    model_slug          TEXT    NOT NULL,
    external_entity_id  TEXT    NOT NULL,
    api_key_prefix      TEXT    NOT NULL,
    group_id            TEXT    NOT NULL,
    workspace_id        TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    input_tokens        BIGINT  NOT NULL,
    output_tokens       BIGINT  NOT NULL,
    cached_input_tokens BIGINT  NOT NULL,
    is_estimated        BOOLEAN NOT NULL
);
CREATE INDEX usage_events_workspace ON usage_events (workspace_id, seq);
CREATE INDEX usage_events_group_day ON usage_events (group_id, model_slug, timestamp);
CREATE INDEX usage_events_request ON usage_events (request_id);

-- Billing webhooks: endpoints, their signing secrets, and the deliveries cut for them.
-- An endpoint's `cursor` is the usage-event `seq` up to which batches were cut.

CREATE TABLE webhook_endpoints (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT   NOT NULL UNIQUE,
    workspace_id TEXT   NOT NULL REFERENCES workspaces (id),
    url          TEXT   NOT NULL,
    description  TEXT,
    cursor       BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    deleted_at   BIGINT
);
CREATE INDEX webhook_endpoints_workspace ON webhook_endpoints (workspace_id, seq);

CREATE TABLE webhook_secrets (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    webhook_id  TEXT   NOT NULL REFERENCES webhook_endpoints (id),
    -- The `whsec_...` text sealed with the master key.
    ciphertext  BYTEA  NOT NULL,
    created_at  BIGINT NOT NULL,
    -- NULL while the secret is the current one; set by a rotation.
    expires_at  BIGINT
);
CREATE INDEX webhook_secrets_webhook ON webhook_secrets (webhook_id, seq);

CREATE TABLE webhook_deliveries (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT   NOT NULL UNIQUE,
    webhook_id       TEXT   NOT NULL REFERENCES webhook_endpoints (id),
    body             BYTEA  NOT NULL,
    event_count      BIGINT NOT NULL,
    first_event_seq  BIGINT NOT NULL,
    last_event_seq   BIGINT NOT NULL,
    status           TEXT   NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         BIGINT NOT NULL DEFAULT 0,
    retry_step       BIGINT NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    last_attempt_at  BIGINT,
    last_http_status BIGINT,
    last_error       TEXT,
    -- An instance sending this delivery holds it until this time.
    lease_until      BIGINT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX webhook_deliveries_webhook ON webhook_deliveries (webhook_id, seq);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at);
