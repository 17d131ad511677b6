-- syncd mirrors each changed count into the legacy column `chats.participants_count`. The
-- legacy trigger `update_chats_updated_at` stamps `updated_at = now()` on every update, so the
-- mirror would move `updated_at` whenever a count changes, and the admin panel's "sort by
-- updated_at" would mean "count changed lately" instead of "edited lately". The count's own
-- time is `chat_participants.participants_updated_at`.
--
-- This trigger puts the old `updated_at` back for the mirror's writes only: syncd marks its
-- transaction with `set_config('participants.count_mirror', 'on', true)` (transaction-local,
-- so it works through PgBouncer in transaction mode too). Every other update, the legacy
-- service's included, is stamped as before. BEFORE triggers run in name order: the name sorts
-- after the legacy trigger's (and after any `update_…` or `set_…` name a deployment used).
-- The previous release's syncd does not mark its writes, and is unaffected.

create or replace function participants_count_mirror_keeps_updated_at() returns trigger
    language plpgsql as $$
begin
    new.updated_at = old.updated_at;
    return new;
end
$$;

do $$
begin
    if not exists (select 1 from pg_trigger
                   where tgname = 'zz_participants_count_mirror_keeps_updated_at'
                     and tgrelid = 'chats'::regclass) then
        create trigger zz_participants_count_mirror_keeps_updated_at
            before update of participants_count on chats
            for each row
            when (current_setting('participants.count_mirror', true) = 'on')
            execute function participants_count_mirror_keeps_updated_at();
    end if;
end
$$;
