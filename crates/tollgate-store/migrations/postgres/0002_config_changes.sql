-- The configuration change log (see migrations/sqlite/0004_config_changes.sql). Rows are
-- inserted under a global advisory lock taken last in the writing transaction, so
-- sequence numbers become visible in commit order, and each insert notifies channel
-- `tollgate_config` with its `seq` at commit.
CREATE TABLE config_changes (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT   NOT NULL
               CHECK (kind IN ('workspace', 'secret', 'endpoint', 'group', 'api_key')),
    -- The object's id; the key prefix for an API key.
    object_id  TEXT   NOT NULL,
    -- Milliseconds since the epoch, by the database's clock; pruning reads it.
    changed_at BIGINT NOT NULL
);
CREATE INDEX config_changes_changed_at ON config_changes (changed_at);

-- One row: the largest `seq` ever pruned.
CREATE TABLE config_changes_pruned (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    through_seq BIGINT NOT NULL
);
INSERT INTO config_changes_pruned (id, through_seq) VALUES (1, 0);
