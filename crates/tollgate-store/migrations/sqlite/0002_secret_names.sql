-- A secret's name is unique among its workspace's live secrets (a deleted secret's name
-- can be reused), enforced by the database rather than by callers.
CREATE UNIQUE INDEX secrets_live_name ON secrets (workspace_id, name) WHERE deleted_at IS NULL;
