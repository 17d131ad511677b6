-- no-transaction
-- Sort by participants_count.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_participants_count_id_idx on chats (participants_count, id);
