-- no-transaction
-- The substring search of GET /chats/all; the expression must stay identical to SEARCH_DOCUMENT in api/src/chats.rs.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_search_trgm_idx on chats using gin (
    (coalesce(name, '') || ' ' || coalesce(department, '') || ' ' || coalesce(max_chat_id, '')
        || ' ' || coalesce(source, '')) gin_trgm_ops
);
