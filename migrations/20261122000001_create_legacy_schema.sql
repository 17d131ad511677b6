-- The chat-service schema, created only where it is absent. On a legacy database every
-- statement here is a no-op: existing tables, indexes, functions and triggers are kept as they are.

create table if not exists chats (
    id serial primary key,
    name text not null,
    url text not null,
    max_chat_id text,
    participants_count integer default 0,
    university_id integer,
    department text,
    source text not null check (source in ('admin_panel', 'bot_registrar', 'academic_group')),
    external_chat_id text,
    created_at timestamptz default now(),
    updated_at timestamptz default now()
);

create table if not exists administrators (
    id serial primary key,
    chat_id integer not null references chats (id) on delete cascade,
    phone text not null,
    max_id text,
    add_user boolean default true,
    add_admin boolean default true,
    created_at timestamptz default now(),
    updated_at timestamptz default now(),
    unique (chat_id, phone)
);

create index if not exists idx_chats_name on chats (name);
create index if not exists idx_chats_max_chat_id on chats (max_chat_id);
create index if not exists idx_chats_source on chats (source);
create index if not exists idx_chats_external_chat_id on chats (external_chat_id);
create index if not exists idx_chats_name_search on chats using gin (to_tsvector('russian', name));
create index if not exists idx_administrators_chat_id on administrators (chat_id);

do $$
begin
    if not exists (select 1 from pg_proc where proname = 'update_updated_at_column') then
        create function update_updated_at_column() returns trigger language plpgsql as $f$
        begin
            new.updated_at = now();
            return new;
        end
        $f$;
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'update_chats_updated_at' and tgrelid = 'chats'::regclass) then
        create trigger update_chats_updated_at before update on chats
            for each row execute function update_updated_at_column();
    end if;
    if not exists (select 1 from pg_trigger
                   where tgname = 'update_administrators_updated_at'
                     and tgrelid = 'administrators'::regclass) then
        create trigger update_administrators_updated_at before update on administrators
            for each row execute function update_updated_at_column();
    end if;
end
$$;
