-- The relay's mark and the admin key look-up as PL/pgSQL (issue 16 part 3;
-- ADR-0027). A SQL-language function that is not inlined — and a
-- `SECURITY DEFINER` one never is — is parsed and planned again on every
-- call; a PL/pgSQL function keeps its plans per connection. Under the
-- enrollment bench, `oneprotect_outbox_mark_sent_many` (every relay batch)
-- spent ≈ 8 % of PostgreSQL's CPU parsing and planning itself. Same
-- signatures, same owner and grants (`CREATE OR REPLACE` keeps them), same
-- statements; the columns are qualified, as PL/pgSQL needs where a name is
-- also an output column.

CREATE OR REPLACE FUNCTION oneprotect_outbox_mark_sent_many(p_at bigint, VARIADIC p_seqs bigint[])
    RETURNS void
    LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$
BEGIN
    UPDATE events_outbox o SET published_at = p_at
        WHERE o.seq = ANY (p_seqs) AND o.published_at IS NULL;
END
$$;

CREATE OR REPLACE FUNCTION oneprotect_admin_key_ref(h bytea)
    RETURNS TABLE (key_id uuid, tenant_id uuid)
    LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$
BEGIN
    RETURN QUERY
        SELECT k.id, k.tenant_id FROM admin_keys k WHERE k.key_hash = h AND k.revoked_at IS NULL;
END
$$;
