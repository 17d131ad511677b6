-- no-transaction
-- Sort by max_chat_id.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_max_chat_id_id_idx on chats (max_chat_id, id);
