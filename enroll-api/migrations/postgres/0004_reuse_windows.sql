-- One row per superseded certificate and attempt window in which a use of it
-- was recorded (issue 15, item 13): the row is inserted in the transaction
-- that writes agent.certificate.reuse_detected, and its primary key lets only
-- the window's first report (from any gateway, through any replica) write
-- the event.
CREATE TABLE reuse_windows (
    serial text NOT NULL REFERENCES certificates (serial),
    window_start bigint NOT NULL,
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    first_seen bigint NOT NULL,
    PRIMARY KEY (serial, window_start)
);
CREATE INDEX reuse_windows_tenant ON reuse_windows (tenant_id);

ALTER TABLE reuse_windows ENABLE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON reuse_windows
    USING (tenant_id = oneprotect_current_tenant())
    WITH CHECK (tenant_id = oneprotect_current_tenant());

GRANT SELECT, INSERT ON reuse_windows TO oneprotect_app;
