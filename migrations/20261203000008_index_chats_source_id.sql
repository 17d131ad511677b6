-- no-transaction
-- Sort by source.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_source_id_idx on chats (source, id);
