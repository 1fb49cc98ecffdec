-- The relay marks a whole batch of outbox rows sent in one statement (issue 16
-- part 3: one transaction per batch instead of one per row). As narrow as the
-- one-row function it replaces: exactly the listed rows, only if not yet sent.

CREATE FUNCTION oneprotect_outbox_mark_sent_many(p_at bigint, VARIADIC p_seqs bigint[]) RETURNS void
    LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ UPDATE events_outbox SET published_at = p_at WHERE seq = ANY (p_seqs) AND published_at IS NULL $$;

REVOKE ALL ON FUNCTION oneprotect_outbox_mark_sent_many(bigint, bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION oneprotect_outbox_mark_sent_many(bigint, bigint[]) TO oneprotect_app;

-- Nothing calls the one-row form any more: one privileged function fewer.
DROP FUNCTION oneprotect_outbox_mark_sent(bigint, bigint);
