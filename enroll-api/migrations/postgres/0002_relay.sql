-- The outbox relay and the projection rebuild read across tenants. As with
-- the token and admin-key look-ups, the app role gets no blanket access:
-- three narrow SECURITY DEFINER functions return exactly what those two
-- tasks need (pending outbox rows, marking one sent, the tenant ids). The
-- rebuild then reads each tenant's agents and certificates under RLS.

CREATE FUNCTION oneprotect_outbox_pending(lim bigint) RETURNS TABLE (seq bigint, body text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ SELECT o.seq, o.body FROM events_outbox o WHERE o.published_at IS NULL ORDER BY o.seq LIMIT lim $$;

CREATE FUNCTION oneprotect_outbox_mark_sent(p_seq bigint, p_at bigint) RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ UPDATE events_outbox SET published_at = p_at WHERE seq = p_seq AND published_at IS NULL $$;

CREATE FUNCTION oneprotect_tenant_ids() RETURNS TABLE (tenant_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ SELECT t.id FROM tenants t ORDER BY t.id $$;

REVOKE ALL ON FUNCTION oneprotect_outbox_pending(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION oneprotect_outbox_mark_sent(bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION oneprotect_tenant_ids() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION oneprotect_outbox_pending(bigint) TO oneprotect_app;
GRANT EXECUTE ON FUNCTION oneprotect_outbox_mark_sent(bigint, bigint) TO oneprotect_app;
GRANT EXECUTE ON FUNCTION oneprotect_tenant_ids() TO oneprotect_app;
