-- Foreign keys that carry the tenant (issue 16 part 3; ADR-0027).
--
-- An agent referenced its token by id alone, and a certificate its agent by id
-- alone, each with a second key to `tenants`: nothing in the schema said that an
-- agent's token, or a certificate's agent, is of the same tenant (the service
-- writes them so, and row-level security filters reads, but a write under the
-- wrong tenant setting would not have been refused by the references). Now
-- each reference is `(tenant_id, …)` to the parent's `(tenant_id, id)`: a
-- cross-tenant reference is refused by the database itself, and the parent's
-- own key to `tenants` implies the tenant exists, so the direct keys to
-- `tenants` go. Every exchange checked five references; now three (the
-- outbox row's to `tenants` stays).
--
-- The `(tenant_id, id)` indexes both parents already had become unique (a
-- foreign key needs one); `id` alone is the primary key, so this can refuse no
-- existing row. The new keys are validated against the existing rows.

CREATE UNIQUE INDEX enrollment_tokens_tenant_id ON enrollment_tokens (tenant_id, id);
DROP INDEX enrollment_tokens_tenant;
ALTER TABLE enrollment_tokens
    ADD CONSTRAINT enrollment_tokens_tenant_id_key UNIQUE USING INDEX enrollment_tokens_tenant_id;

CREATE UNIQUE INDEX agents_tenant_id ON agents (tenant_id, id);
DROP INDEX agents_tenant;
ALTER TABLE agents ADD CONSTRAINT agents_tenant_id_key UNIQUE USING INDEX agents_tenant_id;

ALTER TABLE agents
    ADD CONSTRAINT agents_token_in_tenant FOREIGN KEY (tenant_id, token_id)
        REFERENCES enrollment_tokens (tenant_id, id),
    DROP CONSTRAINT agents_token_id_fkey,
    DROP CONSTRAINT agents_tenant_id_fkey;

ALTER TABLE certificates
    ADD CONSTRAINT certificates_agent_in_tenant FOREIGN KEY (tenant_id, agent_id)
        REFERENCES agents (tenant_id, id),
    DROP CONSTRAINT certificates_agent_id_fkey,
    DROP CONSTRAINT certificates_tenant_id_fkey;
