-- syncd's bookkeeping: how often a chat is read (to weight the stale sweep toward chats people
-- actually look at), and one row per sweep so that each cron slot runs once across replicas
-- and an interrupted sweep resumes where it stopped.

alter table chat_participants add column if not exists read_count integer not null default 0;
alter table chat_participants add column if not exists last_read_at timestamptz;

create table if not exists sync_sweeps (
    -- stale or full
    kind text not null,
    -- the cron slot this sweep serves, or the moment an operator asked for it
    slot timestamptz not null,
    -- the replica running it, and until when its claim holds without a renewal
    owner text,
    lease_until timestamptz,
    -- full: the last chats.id done; stale: chats done
    position integer not null default 0,
    planned integer,
    done integer not null default 0,
    failed integer not null default 0,
    started_at timestamptz not null default now(),
    finished_at timestamptz,
    primary key (kind, slot)
);

create index if not exists sync_sweeps_unfinished_idx on sync_sweeps (slot) where finished_at is null;
