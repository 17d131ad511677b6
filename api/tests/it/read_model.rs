//! The read model answers exactly what Postgres would: every sort in both orders under the
//! database's own collation, search as `ilike`, totals and scopes; and it follows the legacy
//! service's writes by notification, and by reconciliation when a notification is lost.

use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::helpers::{eventually, metric, urlencode, TestApp, SORT_COLUMNS};

/// The text the legacy search matched each word against.
const DOCUMENT: &str = "(coalesce(name, '') || ' ' || coalesce(department, '') || ' ' \
     || coalesce(max_chat_id, '') || ' ' || coalesce(source, ''))";

const NAMES: [&str; 32] = [
    "Математика",
    "математика",
    "МАТЕМАТИКА",
    "Ёлка",
    "елка",
    "ёлка",
    "Елка",
    "Alpha",
    "alpha",
    "ALPHA",
    "Zeta",
    "Äpfel",
    "äpfel",
    "apfel",
    "İstanbul",
    "istanbul",
    "ΣΟΦΙΑ",
    "σοφια",
    "a_b",
    "a%b",
    "a\\b",
    "50%",
    " leading",
    "trailing ",
    "x-y",
    "x y",
    "Юрфак 2021",
    "",
    "123",
    "1-2",
    "Физика 2021 группа 7",
    "физика",
];
const DEPARTMENTS: [Option<&str>; 6] = [
    Some("Мехмат"),
    Some("мехмат"),
    None,
    Some("ВМК"),
    Some(""),
    Some("Юрфак"),
];

/// A legacy table's worth of awkward rows: Cyrillic and Latin, mixed case, ties, NULLs.
async fn seed(app: &TestApp, n: usize) {
    for i in 0..n {
        let name = format!(
            "{}{}",
            NAMES[i % NAMES.len()],
            if i % 5 == 0 {
                String::new()
            } else {
                format!(" {}", i % 7)
            }
        );
        let max_chat_id = match i % 6 {
            0 => None,
            1 => Some("not-a-number".to_owned()),
            _ => Some(format!("-7000000000{:04}", i % 40)),
        };
        sqlx::query(
            "insert into chats (name, url, max_chat_id, participants_count, university_id, \
             department, source, created_at) \
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&name)
        .bind(format!(
            "https://max.ru/join/{}",
            NAMES[(i * 7) % NAMES.len()]
        ))
        .bind(max_chat_id)
        .bind((i % 4 != 0).then_some((i % 9) as i32))
        .bind(match i % 3 {
            0 => Some(1),
            1 => Some(2),
            _ => None,
        })
        .bind(DEPARTMENTS[i % DEPARTMENTS.len()])
        .bind(["admin_panel", "bot_registrar", "academic_group"][i % 3])
        .bind(
            (i % 8 != 0)
                .then(|| chrono::DateTime::from_timestamp(1_700_000_000 + (i % 11) as i64 * 60, 0)),
        )
        .execute(&app.db)
        .await
        .unwrap();
    }
    app.settle().await;
}

fn like_pattern(word: &str) -> String {
    let mut pattern = String::from("%");
    for c in word.chars() {
        if matches!(c, '\\' | '%' | '_') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// Every row the api answers for a query, page by page, and the total it reports.
async fn served(app: &TestApp, token: &str, query: &str) -> (Vec<i64>, i64) {
    let mut ids = Vec::new();
    let mut offset = 0;
    loop {
        let response = app
            .get(
                &format!("/chats/all?limit=37&offset={offset}{query}"),
                Some(token),
            )
            .await;
        assert_eq!(response.status(), 200, "{query}");
        let page: Json = response.json().await.unwrap();
        let data = page["data"].as_array().unwrap();
        ids.extend(data.iter().map(|chat| chat["id"].as_i64().unwrap()));
        if data.len() < 37 {
            return (ids, page["total"].as_i64().unwrap());
        }
        offset += 37;
    }
}

/// What Postgres itself answers.
async fn expected(app: &TestApp, filter: &str, binds: &[String], order: &str) -> Vec<i64> {
    let sql = format!("select id::bigint from chats where true {filter} order by {order}");
    let mut query = sqlx::query_scalar::<_, i64>(&sql);
    for bind in binds {
        query = query.bind(bind);
    }
    query.fetch_all(&app.db).await.unwrap()
}

async fn assert_same_as_postgres(app: &TestApp) {
    let admin = app.admin();
    for sort in SORT_COLUMNS {
        for dir in ["asc", "desc"] {
            let (ids, total) =
                served(app, &admin, &format!("&sort_by={sort}&sort_order={dir}")).await;
            let order = if sort == "id" {
                format!("id {dir}")
            } else {
                format!("{sort} {dir}, id {dir}")
            };
            let want = expected(app, "", &[], &order).await;
            assert_eq!(ids, want, "sort_by={sort} sort_order={dir}");
            assert_eq!(total as usize, want.len());
        }
    }
    let curator = app.token("curator", Some(1));
    for sort in ["name", "participants_count", "department"] {
        let (ids, total) = served(app, &curator, &format!("&sort_by={sort}&sort_order=desc")).await;
        let want = expected(
            app,
            "and university_id = 1",
            &[],
            &format!("{sort} desc, id desc"),
        )
        .await;
        assert_eq!(
            (ids, total as usize),
            (want.clone(), want.len()),
            "curator, sort_by={sort}"
        );
    }
    for search in [
        "мат",
        "МАТ",
        "Математика",
        "ёлка",
        "ЕЛКА",
        "Ё",
        "alpha",
        "ALP",
        "äpfel",
        "ÄPF",
        "istanbul",
        "İ",
        "σοφια",
        "ΣΟΦ",
        "a_b",
        "_",
        "%",
        "50%",
        "a\\b",
        "\\",
        "-70000000",
        "0001",
        "2021",
        "физика 2021",
        "мехмат 3",
        "admin_panel",
        "BOT",
        "nothing-matches-this",
        "1",
        "x-y",
        "группа 7",
    ] {
        // The words as the api splits them (the legacy's split), each matched as `ilike`.
        let words: Vec<String> = api::read_model::query::search_words(search)
            .iter()
            .map(|word| like_pattern(word))
            .collect();
        let filter: String = (1..=words.len())
            .map(|n| format!(" and {DOCUMENT} ilike ${n}"))
            .collect();
        for (token, scope) in [(&admin, ""), (&curator, " and university_id = 1")] {
            let (ids, total) = served(app, token, &format!("&search={}", urlencode(search))).await;
            let want = expected(app, &format!("{filter}{scope}"), &words, "name asc, id asc").await;
            assert_eq!(ids, want, "search={search:?} scope={scope:?}");
            assert_eq!(total as usize, want.len(), "search={search:?}");
        }
    }
}

/// Renames into ties, NULLs a column, moves a chat, deletes and inserts: the orders must follow.
async fn change_behind_the_apis_back(app: &TestApp) {
    for sql in [
        "update chats set name = 'Alpha' where id % 10 = 3",
        "update chats set department = null, participants_count = null where id % 7 = 2",
        "update chats set university_id = 1 where id % 9 = 4",
        "update chats set created_at = null where id % 6 = 5",
        "delete from chats where id % 11 = 0",
        "insert into chats (name, url, source, max_chat_id) values ('ёж', 'u', 'admin_panel', '-70000000000999'), ('ЁЖ', 'v', 'bot_registrar', null)",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
    }
    app.settle().await;
}

#[tokio::test]
async fn every_sort_search_and_scope_equals_postgres_under_a_c_utf8_collation() {
    let app = TestApp::spawn().await;
    seed(&app, 160).await;
    assert_same_as_postgres(&app).await;
    change_behind_the_apis_back(&app).await;
    assert_same_as_postgres(&app).await;
}

#[tokio::test]
async fn every_sort_search_and_scope_equals_postgres_under_an_icu_russian_collation() {
    let app = TestApp::spawn_on(
        Some((
            "chat_service_ru",
            "template template0 encoding 'UTF8' locale_provider icu icu_locale 'ru-RU' locale 'C.UTF-8'",
        )),
        |_| {},
    )
    .await;
    seed(&app, 160).await;
    assert_same_as_postgres(&app).await;
    change_behind_the_apis_back(&app).await;
    assert_same_as_postgres(&app).await;
}

#[tokio::test]
async fn a_legacy_rename_is_served_by_notification_within_seconds() {
    // Reconciliation is pushed out of the way: only a notification can bring the change.
    let app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    let id = app.insert_chat(Default::default()).await;
    for round in 0..5 {
        let name = format!("renamed {round}");
        let written = Instant::now();
        sqlx::query("update chats set name = $1 where id = $2")
            .bind(&name)
            .bind(id)
            .execute(&app.db)
            .await
            .unwrap();
        loop {
            let chat: Json = app
                .get(&format!("/chats/{id}"), Some(&app.admin()))
                .await
                .json()
                .await
                .unwrap();
            if chat["name"] == name.as_str() {
                break;
            }
            // Generous for a shared CI machine; `bench read` measures the real delay.
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "round {round}: not served"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains("participants_read_model_rows_loaded_total{reason=\"notified\"}"));
    assert_eq!(
        metric(
            &metrics,
            "participants_read_model_rows_loaded_total{reason=\"reconciled\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn a_change_whose_notification_is_lost_is_healed_by_reconciliation() {
    let app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(1);
    })
    .await;
    let id = app.insert_chat(Default::default()).await;
    // As if the notification never arrived: the trigger does not fire at all.
    for sql in [
        "alter table chats disable trigger participants_notify_on_chats",
        "update chats set name = 'changed unnoticed'",
        "insert into chats (name, url, source) values ('inserted unnoticed', 'u', 'admin_panel')",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
    }
    app.settle().await;
    let chat = app.get_json(&format!("/chats/{id}")).await;
    assert_eq!(chat["name"], "changed unnoticed");
    let metrics = app.metrics().await;
    assert!(
        metric(
            &metrics,
            "participants_read_model_rows_loaded_total{reason=\"reconciled\"}"
        ) >= 2.0,
        "reconciliation loaded the rows"
    );
    sqlx::query("delete from chats where name = 'inserted unnoticed'")
        .execute(&app.db)
        .await
        .unwrap();
    app.settle().await;
    eventually(Duration::from_secs(5), || async {
        app.get_json("/chats/all").await["total"] == 1
    })
    .await;
}

/// The administrators `GET /chats/{id}` shows, as (phone, max_id) pairs; `None` for `null`.
async fn administrators(app: &TestApp, id: i32) -> Served {
    let chat = app.get_json(&format!("/chats/{id}")).await;
    chat["administrators"].as_array().map(|admins| {
        admins
            .iter()
            .map(|a| {
                (
                    a["phone"].as_str().unwrap().to_owned(),
                    a["max_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    })
}

type Served = Option<Vec<(String, String)>>;

fn pairs(items: &[(&str, &str)]) -> Served {
    Some(
        items
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect(),
    )
}

#[tokio::test]
async fn administrators_changes_are_served_by_notification() {
    // Reconciliation is pushed out of the way: only a notification can bring the change.
    let app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(3600);
    })
    .await;
    let id = app.insert_chat(Default::default()).await;
    let other = app
        .insert_chat(crate::helpers::NewChat {
            name: "other",
            ..Default::default()
        })
        .await;
    assert_eq!(administrators(&app, id).await, None);
    let steps: [(&str, Served, Served); 5] = [
        (
            "insert into administrators (chat_id, phone, max_id, created_at) values \
             ($1, '+7001', null, '2025-01-02'), ($1, '+7002', '42', '2025-01-01')",
            pairs(&[("+7002", "42"), ("+7001", "")]),
            None,
        ),
        (
            "update administrators set max_id = '43' where phone = '+7001'",
            pairs(&[("+7002", "42"), ("+7001", "43")]),
            None,
        ),
        // Moved to another chat: both chats are notified.
        (
            "update administrators set chat_id = $2 where chat_id = $1 and phone = '+7002'",
            pairs(&[("+7001", "43")]),
            pairs(&[("+7002", "42")]),
        ),
        (
            "delete from administrators where phone = '+7001'",
            None,
            pairs(&[("+7002", "42")]),
        ),
        ("truncate administrators", None, None),
    ];
    for (sql, want, want_other) in steps {
        let mut query = sqlx::query(sql);
        if sql.contains("$1") {
            query = query.bind(id);
        }
        if sql.contains("$2") {
            query = query.bind(other);
        }
        query.execute(&app.db).await.unwrap();
        let written = Instant::now();
        loop {
            let served = (
                administrators(&app, id).await,
                administrators(&app, other).await,
            );
            if served == (want.clone(), want_other.clone()) {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "{sql}: served {served:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(
        metric(
            &app.metrics().await,
            "participants_read_model_rows_loaded_total{reason=\"reconciled\"}"
        ),
        0.0
    );
}

#[tokio::test]
async fn administrators_changed_unnoticed_are_healed_by_reconciliation() {
    let app = TestApp::spawn_with(|args| {
        args.read_model_reconcile_interval = Duration::from_secs(1);
    })
    .await;
    let id = app.insert_chat(Default::default()).await;
    sqlx::query("insert into administrators (chat_id, phone) values ($1, '+7001')")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(5), || async {
        administrators(&app, id).await == pairs(&[("+7001", "")])
    })
    .await;
    // As if the notifications never arrived: the trigger does not fire at all.
    for sql in [
        "alter table administrators disable trigger participants_notify_on_administrators",
        "update administrators set max_id = 'unnoticed'",
        "insert into administrators (chat_id, phone, created_at) values ($1, '+7002', 'infinity')",
    ] {
        let mut query = sqlx::query(sql);
        if sql.contains("$1") {
            query = query.bind(id);
        }
        query.execute(&app.db).await.unwrap();
    }
    eventually(Duration::from_secs(10), || async {
        administrators(&app, id).await == pairs(&[("+7001", "unnoticed"), ("+7002", "")])
    })
    .await;
    sqlx::query("delete from administrators")
        .execute(&app.db)
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        administrators(&app, id).await.is_none()
    })
    .await;
    let reconciled = || async {
        metric(
            &app.metrics().await,
            "participants_read_model_rows_loaded_total{reason=\"reconciled\"}",
        )
    };
    let healed = reconciled().await;
    assert!(healed >= 2.0, "reconciliation loaded the rows");
    // The model's versions now equal Postgres': later rounds reload nothing.
    sqlx::query("insert into administrators (chat_id, phone) values ($1, '+7003')")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(reconciled().await, healed + 1.0, "only the new row, once");
}

/// A legacy `administrators` table is whatever the legacy made it (`create table if not exists`
/// guarantees nothing): a NULL phone and timestamps without a time zone are served, not a
/// load that fails on every replica.
#[tokio::test]
async fn administrators_with_a_null_phone_and_naive_timestamps_are_served() {
    let app = TestApp::spawn().await;
    for sql in [
        "alter table administrators alter column phone drop not null",
        "alter table administrators alter column created_at type timestamp",
        "alter table administrators alter column updated_at type timestamp",
    ] {
        sqlx::query(sql).execute(&app.db).await.unwrap();
    }
    let id = app.insert_chat(Default::default()).await;
    sqlx::query(
        "insert into administrators (chat_id, phone, max_id, created_at, updated_at) \
         values ($1, null, '7', '2025-01-01 10:00', '2025-01-01 10:00')",
    )
    .bind(id)
    .execute(&app.db)
    .await
    .unwrap();
    eventually(Duration::from_secs(20), || async {
        administrators(&app, id).await == pairs(&[("", "7")])
    })
    .await;
}
