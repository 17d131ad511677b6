-- Who started each sweep, what covered a slot that came while another sweep of its kind was
-- running, and the MAX calls a sweep made: what the admin panel's progress bar and
-- `syncd status` show. Only adds nullable or defaulted columns; the previous release keeps
-- writing its rows as before.

-- schedule, command (`syncd sweep`) or admin; null on rows written before this column
alter table sync_sweeps add column if not exists started_by text;
-- the admin's user id (token `sub`) for an admin's request
alter table sync_sweeps add column if not exists requested_by text;
-- the slot of the running sweep of the same kind that served this slot instead
alter table sync_sweeps add column if not exists covered_by timestamptz;
-- MAX calls made: one per chat asked
alter table sync_sweeps add column if not exists calls integer not null default 0;
