-- Least-privilege grants for the relay's database role.
--
-- The relay reads and updates outbox rows, leases partitions, registers itself,
-- reads the schema registry, and checks the migration revision for readiness.
-- It needs nothing else: no INSERT into outbox_event (producers write rows), no
-- DDL (`outbox migrate` runs as the schema owner), no access to service tables.
--
-- Create the role yourself (its password belongs in your secret store), then:
--   psql -v role=outbox_relay -f relay_role.sql          (or: outbox grant-relay-role ROLE)
-- Run it as the owner of the outbox tables, after `outbox migrate`.

GRANT SELECT, UPDATE, DELETE ON outbox_event TO :"role";
GRANT SELECT, UPDATE ON outbox_partition TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relay TO :"role";
GRANT SELECT ON outbox_schema TO :"role";
GRANT SELECT ON outbox_alembic_version TO :"role";
