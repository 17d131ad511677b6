-- Demo chats for `make run`: :n chats over five universities, as the chat-service stores them.
-- Every 50th chat has no MAX id and every 97th an unusable one, as in real data.
insert into chats (name, url, max_chat_id, participants_count, university_id, department, source, external_chat_id)
select
    (array['Математика', 'Физика', 'История', 'Информатика', 'Химия', 'Биология'])[1 + g % 6]
        || ' ' || (2020 + g % 6) || ' группа ' || g,
    'https://max.ru/join/demo-' || g,
    case
        when g % 50 = 0 then null
        when g % 97 = 0 then 'chat-' || g
        else (-70000000000000 - g)::text
    end,
    5 + (g * 7919) % 300,
    1 + g % 5,
    (array['Мехмат', 'Физфак', 'Истфак', 'ВМК', 'Химфак', null])[1 + g % 6],
    (array['admin_panel', 'bot_registrar', 'academic_group'])[1 + g % 3],
    case when g % 3 = 0 then 'ext-' || g end
from generate_series(1, :n) g;
