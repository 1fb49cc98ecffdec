-- One row per superseded certificate and attempt window in which a use of it
-- was recorded (issue 15, item 13): the row is inserted in the transaction
-- that writes agent.certificate.reuse_detected, and its primary key lets only
-- the window's first report write the event.
CREATE TABLE reuse_windows (
    serial TEXT NOT NULL REFERENCES certificates (serial),
    window_start INTEGER NOT NULL,
    tenant_id TEXT NOT NULL REFERENCES tenants (id),
    first_seen INTEGER NOT NULL,
    PRIMARY KEY (serial, window_start)
);
CREATE INDEX reuse_windows_tenant ON reuse_windows (tenant_id);
