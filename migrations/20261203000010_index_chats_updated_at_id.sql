-- no-transaction
-- Sort by updated_at.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_updated_at_id_idx on chats (updated_at, id);
