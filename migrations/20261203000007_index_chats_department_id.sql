-- no-transaction
-- Sort by department.
-- Built concurrently: the legacy service keeps writing `chats` meanwhile.
create index concurrently if not exists chats_department_id_idx on chats (department, id);
