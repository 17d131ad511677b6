-- The grants of the services' runtime roles: `participants_api` (DATABASE_URL of `api serve`)
-- and `participants_syncd` (DATABASE_URL of syncd and its CronJob). Neither owns a table or
-- may run DDL; only `api migrate` (MIGRATE_DATABASE_URL, the schema's owner) changes the schema.
-- Run it as the owner of the tables after `api migrate`, and again after an upgrade whose
-- release notes name a new grant (the release after bc91bf5 reads `administrators`); it is
-- idempotent. README "Database roles" shows how the
-- two login roles are created; make test checks that it shows every grant here.

grant usage on schema public to participants_api, participants_syncd;

-- api: reads the chats, their administrators and sync state into its read model (LISTEN
-- needs no grant), lists sweeps, and records an admin's request for one.
grant select on chats, administrators, chat_participants, sync_sweeps to participants_api;
grant insert on sync_sweeps to participants_api;

-- syncd: reads the chats, writes their sync state and the sweep ledger, and mirrors each
-- count into the one legacy column it may change.
grant select on chats to participants_syncd;
grant update (participants_count) on chats to participants_syncd;
grant select, insert, update on chat_participants to participants_syncd;
grant select, insert, update, delete on sync_sweeps to participants_syncd;
