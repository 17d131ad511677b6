-- no-transaction
-- Curators and operators list their own university, by name unless they sort otherwise.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_university_id_name_id_idx on chats (university_id, name, id);
