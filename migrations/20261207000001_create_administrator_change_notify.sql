-- The api's read model serves each chat with its rows of `administrators` (as the legacy
-- service did). These triggers tell it which chats' administrators changed, on the channel the
-- chats' own triggers use (20261202000001_create_chat_change_notify.sql): every committed
-- insert, update or delete sends the chat's id (both chats' when an update moves a row to
-- another chat), and a TRUNCATE sends `*`, "reload everything". A lost notification is healed
-- by the api's reconciliation, which compares each chat's administrators' version.
-- Additive and idempotent: the previous release, still running, merely reloads a chat whose
-- administrators changed, which it does not show.

create or replace function participants_notify_administrator_change() returns trigger
    language plpgsql as $$
begin
    if tg_op in ('UPDATE', 'DELETE') then
        perform pg_notify('participants_chats_changed', old.chat_id::text);
    end if;
    if tg_op in ('INSERT', 'UPDATE') then
        perform pg_notify('participants_chats_changed', new.chat_id::text);
    end if;
    return null;
end
$$;

do $$
begin
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_administrators'
                     and tgrelid = 'administrators'::regclass) then
        create trigger participants_notify_on_administrators
            after insert or update or delete on administrators
            for each row execute function participants_notify_administrator_change();
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'participants_notify_on_administrators_truncate'
                     and tgrelid = 'administrators'::regclass) then
        create trigger participants_notify_on_administrators_truncate after truncate on administrators
            for each statement execute function participants_notify_chat_truncate();
    end if;
end
$$;
