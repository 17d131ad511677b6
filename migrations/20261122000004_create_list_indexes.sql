-- The extension the substring search needs. The list indexes this migration used to build, in
-- one transaction holding a SHARE lock on the live `chats` (blocking the legacy service's
-- writes for the whole build), are now built one by one with CREATE INDEX CONCURRENTLY in the
-- migrations 20261203000002 to 20261203000011. A database that applied the old text has them
-- already (those migrations are then no-ops), and `api migrate` records this text's checksum
-- for it (shared::db::REWRITTEN_MIGRATIONS).
--
-- pg_trgm is a trusted extension (PostgreSQL 13+): the migrating role needs the CREATE
-- privilege on the database, not superuser; without it, have an administrator run
-- `create extension pg_trgm;` once first.

create extension if not exists pg_trgm;
