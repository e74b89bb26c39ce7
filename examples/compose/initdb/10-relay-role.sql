-- Runs once, when the example PostgreSQL volume is created: the relay's own
-- login role. Its privileges are granted after `outbox migrate` by
-- `outbox grant-relay-role outbox_relay` (the grant-relay-role service).
CREATE ROLE outbox_relay LOGIN PASSWORD 'relay-example';
