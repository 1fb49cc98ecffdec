-- Two-phase rotation (ADR-0010). During a rotation's second phase the agent
-- has a newest certificate (`current_serial`) and the one it rotated away
-- from (`previous_serial`), which stays accepted until the newest is seen or
-- `previous_valid_until` passes. Certificates record their lineage.

ALTER TABLE agents ADD COLUMN previous_serial TEXT;
ALTER TABLE agents ADD COLUMN previous_valid_until INTEGER;
CREATE INDEX agents_rotation_due ON agents (previous_valid_until)
    WHERE previous_valid_until IS NOT NULL;

ALTER TABLE certificates ADD COLUMN predecessor_serial TEXT;
ALTER TABLE certificates ADD COLUMN superseded_at INTEGER;
