-- A least-privilege role for scoresync: it may open replication connections and read the three
-- tables (005_grants.sql), nothing else. Roles are cluster-wide: run this once per cluster. The
-- password is set by whoever runs this file (`psql -v scoresync_password=...`); the local stack
-- uses its own.
--
-- Creating slots needs only REPLICATION. Creating the publication needs ownership of the tables,
-- so `setup` run as this role expects the publication to exist (003_publication.sql, run by the
-- table owner).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'scoresync') THEN
        CREATE ROLE scoresync WITH LOGIN REPLICATION;
    END IF;
END
$$;
ALTER ROLE scoresync WITH LOGIN REPLICATION PASSWORD :'scoresync_password';
