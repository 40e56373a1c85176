-- The registry as of the first PostgreSQL store: models, versions,
-- deployments (with the rollout controller's snapshot), replicas, tokens,
-- the audit log, and counters (the fleet revision, the audit sequence).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (key, value) VALUES ('revision', 0), ('audit', 0);

CREATE TABLE models (
    name TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL,
    next_number BIGINT NOT NULL
);

CREATE TABLE versions (
    model TEXT NOT NULL REFERENCES models(name),
    version TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    size BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    labels TEXT NOT NULL,
    metrics TEXT NOT NULL,
    lineage TEXT,
    input_shapes TEXT NOT NULL,
    status TEXT NOT NULL,
    reached_production BOOLEAN NOT NULL DEFAULT FALSE,
    rolled_back BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (model, version)
);

CREATE TABLE deployments (
    model TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    controller TEXT NOT NULL
);

CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    registration TEXT NOT NULL,
    registered_at BIGINT NOT NULL
);

CREATE TABLE tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE audit (
    seq BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
