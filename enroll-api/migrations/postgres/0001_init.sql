-- OneProtect enroll-api schema, PostgreSQL flavour, with row-level security.
--
-- The service runs as role `oneprotect_app` (NOLOGIN, no BYPASSRLS; the
-- service's login role is a member and does `SET ROLE oneprotect_app` on
-- every connection). Every tenant-scoped table has a policy keyed on the
-- transaction-local setting `oneprotect.tenant_id`; without it a query sees
-- and writes nothing. The migration owner (table owner) is not subject to the
-- policies (no FORCE), which is what the two SECURITY DEFINER look-ups below
-- rely on.

DO $$
BEGIN
    CREATE ROLE oneprotect_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;

DO $$
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO oneprotect_app', current_schema());
END
$$;

CREATE FUNCTION oneprotect_current_tenant() RETURNS uuid
    LANGUAGE sql STABLE
    AS $$ SELECT NULLIF(current_setting('oneprotect.tenant_id', true), '')::uuid $$;

CREATE TABLE tenants (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    leaf_lifetime_secs bigint NOT NULL,
    created_at bigint NOT NULL
);

CREATE TABLE admin_keys (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    name text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    created_at bigint NOT NULL,
    revoked_at bigint
);
CREATE INDEX admin_keys_tenant ON admin_keys (tenant_id);

CREATE TABLE enrollment_tokens (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    token_hash bytea NOT NULL UNIQUE,
    max_uses integer NOT NULL CHECK (max_uses >= 1),
    uses integer NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    expires_at bigint NOT NULL,
    created_at bigint NOT NULL,
    revoked_at bigint,
    description text,
    labels text NOT NULL DEFAULT '{}',
    created_by uuid NOT NULL
);
CREATE INDEX enrollment_tokens_tenant ON enrollment_tokens (tenant_id, id);

CREATE TABLE agents (
    id uuid PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    spiffe_id text NOT NULL UNIQUE,
    status text NOT NULL CHECK (status IN ('active', 'revoked')),
    hostname text NOT NULL,
    os text NOT NULL,
    agent_version text NOT NULL,
    token_id uuid NOT NULL REFERENCES enrollment_tokens (id),
    enrolled_at bigint NOT NULL,
    current_serial text NOT NULL,
    certificate_not_after bigint NOT NULL,
    revoked_at bigint,
    revocation_reason text
);
CREATE INDEX agents_tenant ON agents (tenant_id, id);

CREATE TABLE certificates (
    serial text PRIMARY KEY,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    agent_id uuid NOT NULL REFERENCES agents (id),
    status text NOT NULL CHECK (status IN ('active', 'revoked', 'superseded')),
    fingerprint text NOT NULL UNIQUE,
    not_before bigint NOT NULL,
    not_after bigint NOT NULL,
    cert_pem text NOT NULL,
    issued_at bigint NOT NULL,
    revoked_at bigint
);
CREATE INDEX certificates_agent ON certificates (tenant_id, agent_id);

CREATE TABLE events_outbox (
    seq bigserial PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    event_type text NOT NULL,
    occurred_at bigint NOT NULL,
    body text NOT NULL,
    published_at bigint
);
CREATE INDEX events_outbox_unpublished ON events_outbox (published_at, seq);
CREATE INDEX events_outbox_tenant ON events_outbox (tenant_id, seq);

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = oneprotect_current_tenant())
    WITH CHECK (id = oneprotect_current_tenant());

ALTER TABLE admin_keys ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON admin_keys
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

ALTER TABLE enrollment_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON enrollment_tokens
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

ALTER TABLE agents ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON agents
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

ALTER TABLE certificates ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON certificates
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

ALTER TABLE events_outbox ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON events_outbox
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

-- The two look-ups that run before the tenant is known. Each returns ids
-- only, for exactly one keyed hash; the caller then sets the tenant and reads
-- the row under RLS.
CREATE FUNCTION oneprotect_token_ref(h bytea) RETURNS TABLE (token_id uuid, tenant_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ SELECT id, tenant_id FROM enrollment_tokens WHERE token_hash = h $$;

CREATE FUNCTION oneprotect_admin_key_ref(h bytea) RETURNS TABLE (key_id uuid, tenant_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ SELECT id, tenant_id FROM admin_keys WHERE key_hash = h AND revoked_at IS NULL $$;

REVOKE ALL ON FUNCTION oneprotect_token_ref(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION oneprotect_admin_key_ref(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION oneprotect_token_ref(bytea) TO oneprotect_app;
GRANT EXECUTE ON FUNCTION oneprotect_admin_key_ref(bytea) TO oneprotect_app;
GRANT EXECUTE ON FUNCTION oneprotect_current_tenant() TO oneprotect_app;

GRANT SELECT, INSERT, UPDATE ON tenants, admin_keys, enrollment_tokens, agents, certificates, events_outbox
    TO oneprotect_app;
GRANT USAGE ON SEQUENCE events_outbox_seq_seq TO oneprotect_app;
