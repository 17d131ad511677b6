-- no-transaction
-- Sort by url.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_url_id_idx on chats (url, id);
