-- Tollgate's SQLite schema.
--
-- Every listable table has `seq`, an AUTOINCREMENT rowid: it gives creation order and is
-- the keyset for paging (`WHERE seq > ? ORDER BY seq`). AUTOINCREMENT guarantees a seq is
-- never handed out twice, so a cursor stays meaningful whatever is deleted. Deletes are
-- soft (`deleted_at` / `revoked_at`); timestamps are integer milliseconds since the epoch.

CREATE TABLE workspaces (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL UNIQUE,
    is_enabled  INTEGER NOT NULL DEFAULT 1,
    signing_key BLOB,
    created_at  INTEGER NOT NULL
);

CREATE TABLE management_keys (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    prefix       TEXT    NOT NULL UNIQUE,
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    hash         BLOB    NOT NULL,
    name         TEXT,
    scope        TEXT    NOT NULL CHECK (scope IN ('manage', 'view')),
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);
CREATE INDEX management_keys_workspace ON management_keys (workspace_id, seq);
CREATE INDEX management_keys_hash ON management_keys (hash);

CREATE TABLE secrets (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    name         TEXT    NOT NULL,
    ciphertext   BLOB    NOT NULL,
    created_at   INTEGER NOT NULL,
    deleted_at   INTEGER
);
CREATE INDEX secrets_workspace ON secrets (workspace_id, seq);

CREATE TABLE endpoints (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT    NOT NULL UNIQUE,
    workspace_id TEXT    NOT NULL REFERENCES workspaces (id),
    slug         TEXT    NOT NULL,
    region       TEXT    NOT NULL,
    -- JSON array of tollgate_core::endpoint::Target.
    targets      TEXT    NOT NULL,
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL,
    deleted_at   INTEGER
);
-- A deleted endpoint's slug may be taken again.
CREATE UNIQUE INDEX endpoints_live_slug ON endpoints (slug) WHERE deleted_at IS NULL;
CREATE INDEX endpoints_workspace ON endpoints (workspace_id, seq);

CREATE TABLE groups (
    seq                INTEGER PRIMARY KEY AUTOINCREMENT,
    id                 TEXT    NOT NULL UNIQUE,
    workspace_id       TEXT    NOT NULL REFERENCES workspaces (id),
    name               TEXT,
    external_entity_id TEXT    NOT NULL,
    -- JSON array of tollgate_core::ModelAccess.
    models             TEXT    NOT NULL,
    mode               TEXT    NOT NULL CHECK (mode IN ('INDEPENDENT', 'CASCADING')),
    parent_id          TEXT    REFERENCES groups (id),
    -- 1 for a root.
    depth              INTEGER NOT NULL CHECK (depth BETWEEN 1 AND 5),
    created_at         INTEGER NOT NULL,
    deleted_at         INTEGER
);
-- A deleted group's external_entity_id may be taken again.
CREATE UNIQUE INDEX groups_live_external_id
    ON groups (workspace_id, external_entity_id) WHERE deleted_at IS NULL;
CREATE INDEX groups_workspace ON groups (workspace_id, seq);
CREATE INDEX groups_parent ON groups (parent_id, seq);

CREATE TABLE api_keys (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    -- Unique forever: a revoked key's prefix is never handed out again.
    prefix     TEXT    NOT NULL UNIQUE,
    group_id   TEXT    NOT NULL REFERENCES groups (id),
    hash       BLOB    NOT NULL,
    name       TEXT,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX api_keys_group ON api_keys (group_id, seq);

-- No foreign keys here: a billing record is never refused.
CREATE TABLE usage_events (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key     TEXT    NOT NULL UNIQUE,
    timestamp           INTEGER NOT NULL,
    request_id          TEXT    NOT NULL,
    request_metadata    TEXT,
    model_slug          TEXT    NOT NULL,
    external_entity_id  TEXT    NOT NULL,
    api_key_prefix      TEXT    NOT NULL,
    group_id            TEXT    NOT NULL,
    workspace_id        TEXT    NOT NULL,
    status              TEXT    NOT NULL,
    input_tokens        INTEGER NOT NULL,
    output_tokens       INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    is_estimated        INTEGER NOT NULL
);
CREATE INDEX usage_events_workspace ON usage_events (workspace_id, seq);
CREATE INDEX usage_events_group_day ON usage_events (group_id, model_slug, timestamp);
CREATE INDEX usage_events_request ON usage_events (request_id);
