-- Indexes that serve every whitelisted sort of `GET /chats/all` (each with `id` as the
-- tie-breaker, so pages are stable) and its substring search without a sequential scan.
-- The search expression must stay identical to `SEARCH_DOCUMENT` in api/src/chats.rs.

create extension if not exists pg_trgm;

create index if not exists chats_search_trgm_idx on chats using gin (
    (coalesce(name, '') || ' ' || coalesce(department, '') || ' ' || coalesce(max_chat_id, '')
        || ' ' || coalesce(source, '')) gin_trgm_ops
);

create index if not exists chats_name_id_idx on chats (name, id);
create index if not exists chats_url_id_idx on chats (url, id);
create index if not exists chats_max_chat_id_id_idx on chats (max_chat_id, id);
create index if not exists chats_participants_count_id_idx on chats (participants_count, id);
create index if not exists chats_department_id_idx on chats (department, id);
create index if not exists chats_source_id_idx on chats (source, id);
create index if not exists chats_created_at_id_idx on chats (created_at, id);
create index if not exists chats_updated_at_id_idx on chats (updated_at, id);
-- curators and operators list their own university, by name unless they sort otherwise
create index if not exists chats_university_id_name_id_idx on chats (university_id, name, id);
