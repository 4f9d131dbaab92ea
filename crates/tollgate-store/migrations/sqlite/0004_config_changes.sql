-- The configuration change log. Every write of what the data plane serves from memory
-- (workspaces, secrets, endpoints, groups, API keys) appends one row in the same
-- transaction as the write: "this object changed, read it again". A mirror keeps the
-- `seq` it has applied up to and reads the rows after it. AUTOINCREMENT: a pruned `seq`
-- is never handed out again.
CREATE TABLE config_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    kind       TEXT    NOT NULL
               CHECK (kind IN ('workspace', 'secret', 'endpoint', 'group', 'api_key')),
    -- The object's id; the key prefix for an API key.
    object_id  TEXT    NOT NULL,
    -- Milliseconds since the epoch, by the database's clock; pruning reads it.
    changed_at INTEGER NOT NULL
);
CREATE INDEX config_changes_changed_at ON config_changes (changed_at);

-- One row: the largest `seq` ever pruned. A mirror whose cursor is below it missed
-- changes and loads everything again.
CREATE TABLE config_changes_pruned (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    through_seq INTEGER NOT NULL
);
INSERT INTO config_changes_pruned (id, through_seq) VALUES (1, 0);
