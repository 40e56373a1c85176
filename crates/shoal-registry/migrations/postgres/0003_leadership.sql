-- Several control planes on one registry: the leader lease (one row; its
-- term is the fencing token the leader's writes carry; the incarnation
-- tells a restarted member from the process it replaces), the members that
-- campaign for it, and replicas' latest heartbeats, which every member
-- stores for the others (the leader plans with all of them).
CREATE TABLE leader_lease (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    incarnation TEXT NOT NULL,
    address TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
INSERT INTO leader_lease (id, holder, incarnation, address, term, expires_at)
VALUES (1, '', '', '', 0, 'epoch');

CREATE TABLE members (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    last_seen TIMESTAMPTZ NOT NULL
);

CREATE SEQUENCE heartbeat_seq;
CREATE TABLE heartbeats (
    replica TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    at TIMESTAMPTZ NOT NULL,
    seq BIGINT NOT NULL
);
CREATE INDEX heartbeats_by_seq ON heartbeats (seq);
