-- Two-phase rotation (ADR-0010). During a rotation's second phase the agent
-- has a newest certificate (`current_serial`) and the one it rotated away
-- from (`previous_serial`), which stays accepted until the newest is seen or
-- `previous_valid_until` passes. Certificates record their lineage.

ALTER TABLE agents ADD COLUMN previous_serial text;
ALTER TABLE agents ADD COLUMN previous_valid_until bigint;
CREATE INDEX agents_rotation_due ON agents (previous_valid_until)
    WHERE previous_valid_until IS NOT NULL;

ALTER TABLE certificates ADD COLUMN predecessor_serial text;
ALTER TABLE certificates ADD COLUMN superseded_at bigint;

-- The grace-period sweep reads across tenants: like the relay, it gets one
-- narrow SECURITY DEFINER function returning ids only; the supersede itself
-- then runs per agent under RLS.
CREATE FUNCTION oneprotect_rotations_due(p_now bigint, lim bigint)
    RETURNS TABLE (tenant_id uuid, agent_id uuid)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT
    AS $$ SELECT a.tenant_id, a.id FROM agents a
          WHERE a.previous_valid_until IS NOT NULL AND a.previous_valid_until <= p_now
          ORDER BY a.previous_valid_until LIMIT lim $$;

REVOKE ALL ON FUNCTION oneprotect_rotations_due(bigint, bigint) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION oneprotect_rotations_due(bigint, bigint) TO oneprotect_app;
