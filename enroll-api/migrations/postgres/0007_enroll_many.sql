-- A token's exchanges written in groups: one transaction consumes as many
-- uses as it writes agents (issue 16 part 3, ADR-0027).
--
-- A fleet's agents share one token, so every exchange updated that token's
-- row, and the row's lock was held to the commit. At 16 exchanges in
-- flight the waiters' wake-ups, re-checks and lock traffic were about a
-- seventh of PostgreSQL's CPU, and every exchange paid its own commit (a
-- WAL flush) and its own executor start-ups. The service now queues a
-- token's exchanges while one write of that token is in flight and writes
-- the queue as one group (store/batch.rs): one row lock, one update, one
-- commit, three multi-row inserts.
--
-- `oneprotect_enroll_many` takes the consume's four arguments, then each
-- column of the three rows as an array (the rows in the order the service
-- queued them; every array of the same length). It locks the token's row,
-- grants `least(n, max_uses - uses)` uses while the token is usable, and
-- writes the first `granted` rows of each array: a use is taken exactly
-- when an agent is written, as in `oneprotect_enroll`. Returns the number
-- granted (0: nothing written). The outbox rows get their `seq` in array
-- order. SECURITY INVOKER under row-level security, with the tenant it
-- sets itself, like `oneprotect_enroll`.
--
-- (`oneprotect_enroll` stays for replicas of the previous release during a
-- rolling upgrade; a later migration drops it.)

CREATE FUNCTION oneprotect_enroll_many(
        p_token uuid, p_tenant uuid, p_hash bytea, p_now bigint,
        a_id uuid[], a_tenant uuid[], a_spiffe_id text[], a_status text[], a_hostname text[],
        a_os text[], a_agent_version text[], a_token uuid[], a_enrolled_at bigint[],
        a_current_serial text[], a_certificate_not_after bigint[],
        c_serial text[], c_tenant uuid[], c_agent uuid[], c_fingerprint text[],
        c_not_before bigint[], c_not_after bigint[], c_cert_pem text[], c_issued_at bigint[],
        e_id uuid[], e_tenant uuid[], e_type text[], e_occurred_at bigint[], e_body text[])
    RETURNS integer
    LANGUAGE plpgsql VOLATILE SECURITY INVOKER
    AS $$
DECLARE
    n integer := coalesce(cardinality(a_id), 0);
    granted integer;
BEGIN
    PERFORM set_config('oneprotect.tenant_id', p_tenant::text, true);
    -- The row lock first: a concurrent group of the same token waits, then
    -- this re-reads the row's new version (READ COMMITTED) and grants from
    -- what is left.
    SELECT least(n, max_uses - uses) INTO granted FROM enrollment_tokens
        WHERE id = p_token AND tenant_id = p_tenant AND token_hash = p_hash
        AND revoked_at IS NULL AND uses < max_uses AND expires_at > p_now
        FOR NO KEY UPDATE;
    IF NOT FOUND OR granted <= 0 THEN
        RETURN 0;
    END IF;
    UPDATE enrollment_tokens SET uses = uses + granted
        WHERE id = p_token AND tenant_id = p_tenant;
    INSERT INTO agents (id, tenant_id, spiffe_id, status, hostname, os, agent_version,
                        token_id, enrolled_at, current_serial, certificate_not_after)
        SELECT * FROM unnest(a_id[1:granted], a_tenant[1:granted], a_spiffe_id[1:granted],
                             a_status[1:granted], a_hostname[1:granted], a_os[1:granted],
                             a_agent_version[1:granted], a_token[1:granted],
                             a_enrolled_at[1:granted], a_current_serial[1:granted],
                             a_certificate_not_after[1:granted]);
    INSERT INTO certificates (serial, tenant_id, agent_id, status, fingerprint, not_before,
                              not_after, cert_pem, issued_at)
        SELECT u.serial, u.tenant_id, u.agent_id, 'active', u.fingerprint, u.not_before,
               u.not_after, u.cert_pem, u.issued_at
        FROM unnest(c_serial[1:granted], c_tenant[1:granted], c_agent[1:granted],
                    c_fingerprint[1:granted], c_not_before[1:granted], c_not_after[1:granted],
                    c_cert_pem[1:granted], c_issued_at[1:granted])
             AS u (serial, tenant_id, agent_id, fingerprint, not_before, not_after, cert_pem,
                   issued_at);
    INSERT INTO events_outbox (event_id, tenant_id, event_type, occurred_at, body)
        SELECT u.event_id, u.tenant_id, u.event_type, u.occurred_at, u.body
        FROM unnest(e_id[1:granted], e_tenant[1:granted], e_type[1:granted],
                    e_occurred_at[1:granted], e_body[1:granted])
             WITH ORDINALITY AS u (event_id, tenant_id, event_type, occurred_at, body, i)
        ORDER BY u.i;
    RETURN granted;
END
$$;

REVOKE ALL ON FUNCTION oneprotect_enroll_many(uuid, uuid, bytea, bigint,
    uuid[], uuid[], text[], text[], text[], text[], text[], uuid[], bigint[], text[], bigint[],
    text[], uuid[], uuid[], text[], bigint[], bigint[], text[], bigint[],
    uuid[], uuid[], text[], bigint[], text[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION oneprotect_enroll_many(uuid, uuid, bytea, bigint,
    uuid[], uuid[], text[], text[], text[], text[], text[], uuid[], bigint[], text[], bigint[],
    text[], uuid[], uuid[], text[], bigint[], bigint[], text[], bigint[],
    uuid[], uuid[], text[], bigint[], text[]) TO oneprotect_app;
