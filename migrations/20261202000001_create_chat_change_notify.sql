-- The api keeps an in-memory read model of `chats` and `chat_participants`. These triggers
-- tell it which rows changed: every committed insert, update or delete sends the chat's id on
-- the channel `participants_chats_changed` (Postgres folds duplicates within a transaction),
-- and a TRUNCATE sends `*`, meaning "reload everything". A lost notification (the api was
-- disconnected) is healed by the api's periodic reconciliation, which compares row versions.
-- The channel name is spelled again in api/src/read_model/postgres.rs.

create or replace function participants_notify_chat_change() returns trigger
    language plpgsql as $$
begin
    if tg_table_name = 'chats' then
        perform pg_notify('participants_chats_changed',
            (case when tg_op = 'DELETE' then old.id else new.id end)::text);
    else
        perform pg_notify('participants_chats_changed',
            (case when tg_op = 'DELETE' then old.chat_id else new.chat_id end)::text);
    end if;
    return null;
end
$$;

create or replace function participants_notify_chat_truncate() returns trigger
    language plpgsql as $$
begin
    perform pg_notify('participants_chats_changed', '*');
    return null;
end
$$;

do $$
begin
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_chats' and tgrelid = 'chats'::regclass) then
        create trigger participants_notify_on_chats after insert or update or delete on chats
            for each row execute function participants_notify_chat_change();
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_chats_truncate'
                     and tgrelid = 'chats'::regclass) then
        create trigger participants_notify_on_chats_truncate after truncate on chats
            for each statement execute function participants_notify_chat_truncate();
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_sync_state'
                     and tgrelid = 'chat_participants'::regclass) then
        create trigger participants_notify_on_sync_state
            after insert or update or delete on chat_participants
            for each row execute function participants_notify_chat_change();
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_sync_state_truncate'
                     and tgrelid = 'chat_participants'::regclass) then
        create trigger participants_notify_on_sync_state_truncate after truncate on chat_participants
            for each statement execute function participants_notify_chat_truncate();
    end if;
end
$$;
