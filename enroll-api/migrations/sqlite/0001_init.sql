-- OneProtect enroll-api schema, SQLite flavour. Timestamps are unix seconds;
-- ids are canonical lowercase UUID text. No row-level security exists in
-- SQLite: every query carries its tenant filter (see src/store/sqlite.rs).

CREATE TABLE tenants (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    leaf_lifetime_secs INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE admin_keys (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    name TEXT NOT NULL,
    key_hash BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX admin_keys_tenant ON admin_keys (tenant_id);

CREATE TABLE enrollment_tokens (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    token_hash BLOB NOT NULL UNIQUE,
    max_uses INTEGER NOT NULL CHECK (max_uses >= 1),
    uses INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    description TEXT,
    labels TEXT NOT NULL DEFAULT '{}',
    created_by TEXT NOT NULL
);
CREATE INDEX enrollment_tokens_tenant ON enrollment_tokens (tenant_id, id);

CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    spiffe_id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    hostname TEXT NOT NULL,
    os TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    token_id TEXT NOT NULL REFERENCES enrollment_tokens (id),
    enrolled_at INTEGER NOT NULL,
    current_serial TEXT NOT NULL,
    certificate_not_after INTEGER NOT NULL,
    revoked_at INTEGER,
    revocation_reason TEXT
);
CREATE INDEX agents_tenant ON agents (tenant_id, id);

CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    agent_id TEXT NOT NULL REFERENCES agents (id),
    status TEXT NOT NULL CHECK (status IN ('active', 'revoked', 'superseded')),
    fingerprint TEXT NOT NULL UNIQUE,
    not_before INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    cert_pem TEXT NOT NULL,
    issued_at INTEGER NOT NULL,
    revoked_at INTEGER
);
CREATE INDEX certificates_agent ON certificates (tenant_id, agent_id);

CREATE TABLE events_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    event_type TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    body TEXT NOT NULL,
    published_at INTEGER
);
CREATE INDEX events_outbox_unpublished ON events_outbox (published_at, seq);
CREATE INDEX events_outbox_tenant ON events_outbox (tenant_id, seq);
