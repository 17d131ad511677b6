//! `api migrate` on an empty database and on the legacy chat-service database with rows.

use crate::helpers::serve_args;

#[tokio::test]
async fn migrate_keeps_every_legacy_row_and_only_adds() {
    let pg = testkit::PgServer::start();
    pg.create_database("chat_service");
    pg.psql(
        "chat_service",
        include_str!("fixtures/legacy_chat_service.sql"),
    );
    let before = pg.psql(
        "chat_service",
        "select string_agg(format('%s|%s|%s|%s|%s', id, name, participants_count, created_at, updated_at), ';' order by id) from chats",
    );
    let admins_before = pg.psql("chat_service", "select count(*) from administrators");

    let mut args = serve_args(&pg, "redis://127.0.0.1:1");
    args.database.database_url = pg.database_url("chat_service").into();
    api::migrate(&args.database).await.expect("first migrate");
    api::migrate(&args.database)
        .await
        .expect("second migrate is harmless");

    let after = pg.psql(
        "chat_service",
        "select string_agg(format('%s|%s|%s|%s|%s', id, name, participants_count, created_at, updated_at), ';' order by id) from chats",
    );
    assert_eq!(before, after, "rows and their updated_at are untouched");
    assert_eq!(
        pg.psql("chat_service", "select count(*) from administrators"),
        admins_before
    );
    // What older versions left is still there.
    assert_eq!(
        pg.psql("chat_service", "select count(*) from universities"),
        "2"
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select count(*) from pg_indexes where indexname = 'idx_chats_university_id'"
        ),
        "1"
    );
    assert_eq!(
        pg.psql("chat_service", "select version from schema_migrations"),
        "4"
    );
    // Totals were counted from the existing rows: 2 + 1 + 1 without a university.
    assert_eq!(
        pg.psql("chat_service", "select sum(n) from chat_totals"),
        "4"
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select n from chat_totals where scope_key = 1"
        ),
        "2"
    );
    // The legacy trigger still stamps updated_at; the migration added no second one.
    pg.psql(
        "chat_service",
        "update chats set name = 'renamed' where id = 1",
    );
    assert_eq!(
        pg.psql(
            "chat_service",
            "select updated_at > '2025-02-01 12:00:00+00' from chats where id = 1"
        ),
        "t"
    );
    // The legacy updated_at trigger, chat_totals' three, and the read model's two notifiers.
    assert_eq!(
        pg.psql("chat_service", "select count(*) from pg_trigger where tgrelid = 'chats'::regclass and not tgisinternal"),
        "6"
    );
    // New columns and tables exist, and the legacy service's inserts keep working.
    pg.psql(
        "chat_service",
        "insert into chats (name, url, source) values ('from legacy', 'u', 'admin_panel')",
    );
    assert_eq!(
        pg.psql("chat_service", "select sum(n) from chat_totals"),
        "5"
    );
    assert_eq!(
        pg.psql("chat_service", "select count(*) from chat_participants"),
        "0"
    );
}

#[tokio::test]
async fn migrate_creates_the_schema_on_an_empty_database() {
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("migrate");
    api::migrate(&args.database).await.expect("again");
    for table in [
        "chats",
        "administrators",
        "chat_participants",
        "chat_totals",
    ] {
        assert_eq!(
            pg.psql(
                "postgres",
                &format!("select to_regclass('{table}') is not null")
            ),
            "t",
            "{table}"
        );
    }
    pg.psql(
        "postgres",
        "insert into chats (name, url, source) values ('a', 'u', 'admin_panel')",
    );
    assert_eq!(
        pg.psql("postgres", "select updated_at is not null from chats"),
        "t"
    );
    let before = pg.psql("postgres", "select updated_at from chats");
    pg.psql("postgres", "update chats set name = 'b'");
    assert_ne!(
        pg.psql("postgres", "select updated_at from chats"),
        before,
        "the updated_at trigger exists"
    );
}

#[tokio::test]
async fn every_sort_and_search_is_served_by_an_index() {
    let pg = testkit::PgServer::start();
    let args = serve_args(&pg, "redis://127.0.0.1:1");
    api::migrate(&args.database).await.expect("migrate");
    pg.psql(
        "postgres",
        "insert into chats (name, url, max_chat_id, participants_count, university_id, department, source, created_at, updated_at) \
         select 'chat ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, g % 500, g % 40, 'dept ' || (g % 90), \
                (array['admin_panel','bot_registrar','academic_group'])[1 + g % 3], now() - g * interval '1 minute', now() - g * interval '1 second' \
         from generate_series(1, 20000) g; analyze chats;",
    );
    for column in crate::helpers::SORT_COLUMNS {
        for order in ["asc", "desc"] {
            let tie = if column == "id" {
                String::new()
            } else {
                format!(", id {order}")
            };
            let plan = pg.psql(
                "postgres",
                &format!("explain select * from chats order by {column} {order}{tie} limit 50 offset 100"),
            );
            assert!(
                !plan.contains("Seq Scan") && !plan.contains("Sort"),
                "{column} {order}:\n{plan}"
            );
        }
    }
    // The page's offset is walked over the sort index alone (the deferred join of chats::list).
    pg.psql("postgres", "vacuum analyze chats");
    for column in ["name", "participants_count", "created_at"] {
        let plan = pg.psql(
            "postgres",
            &format!("explain select id from chats order by {column}, id limit 50 offset 5000"),
        );
        assert!(plan.contains("Index Only Scan"), "{column}:\n{plan}");
    }
    // At 20,000 rows a sequential scan is still the cheaper plan (at 150,000 the planner picks
    // the index by itself); what matters here is that the index matches the query's expression.
    let plan = pg.psql(
        "postgres",
        "set enable_seqscan = off; explain select * from chats where (coalesce(name, '') || ' ' || coalesce(department, '') || ' ' || coalesce(max_chat_id, '') || ' ' || coalesce(source, '')) ilike '%chat 1234%'",
    );
    assert!(plan.contains("chats_search_trgm_idx"), "{plan}");
    let plan = pg.psql(
        "postgres",
        "explain select * from chats where university_id = 7 order by name, id limit 50",
    );
    assert!(
        !plan.contains("Sort") && !plan.contains("Seq Scan"),
        "{plan}"
    );
}
