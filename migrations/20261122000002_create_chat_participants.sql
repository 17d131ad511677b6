-- Sync state of each chat's participant count, kept beside `chats` rather than in it: the
-- legacy `updated_at` trigger would otherwise stamp every row on every refresh, and the legacy
-- service keeps writing `chats` while this release runs.
-- `chats.participants_count` stays the value the legacy service and the fallback read; syncd
-- mirrors a changed count into it.

create table if not exists chat_participants (
    chat_id integer primary key references chats (id) on delete cascade,
    -- the last count MAX gave, and when MAX was asked for it (the write fence)
    participants_count integer,
    participants_updated_at timestamptz,
    -- active | removed | left | closed | not_found | forbidden | invalid_id
    sync_status text not null default 'active',
    -- the last time syncd asked MAX about this chat, successfully or not
    checked_at timestamptz,
    last_error text,
    consecutive_failures integer not null default 0
);

create index if not exists chat_participants_updated_at_idx
    on chat_participants (participants_updated_at nulls first);
