-- no-transaction
-- Sort by created_at.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_created_at_id_idx on chats (created_at, id);
