-- no-transaction
-- Sort by name (id breaks ties, so pages are stable).
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_name_id_idx on chats (name, id);
