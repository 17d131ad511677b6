//! `GET /chats/all` and `GET /chats/{id}`: the legacy shape and semantics.

use crate::helpers::{ids, urlencode, NewChat, TestApp};

#[tokio::test]
async fn list_has_the_legacy_shape_and_defaults() {
    let app = TestApp::spawn().await;
    let id = app
        .insert_chat(NewChat {
            name: "Алгебра",
            max_chat_id: Some("-70000000000005"),
            participants_count: 31,
            university_id: Some(3),
            department: Some("Мехмат"),
            source: "academic_group",
        })
        .await;
    let page = app.get_json("/chats/all").await;
    assert_eq!(page["total"], 1);
    assert_eq!(page["limit"], 50);
    assert_eq!(page["offset"], 0);
    assert_eq!(page["total_pages"], 1);
    let chat = &page["data"][0];
    assert_eq!(chat["id"], id);
    assert_eq!(chat["name"], "Алгебра");
    assert_eq!(chat["url"], "https://max.ru/join/Алгебра");
    assert_eq!(chat["max_chat_id"], "-70000000000005");
    // Left out when NULL, as the legacy's `omitempty` did; a chat without administrators has
    // `administrators: null` (a Go nil slice).
    assert!(chat.get("external_chat_id").is_none(), "{chat}");
    assert_eq!(chat["administrators"], serde_json::Value::Null);
    assert!(chat.get("administrators").is_some(), "{chat}");
    assert_eq!(chat["participants_count"], 31);
    assert_eq!(chat["university_id"], 3);
    assert_eq!(chat["department"], "Мехмат");
    assert_eq!(chat["source"], "academic_group");
    assert!(chat["created_at"].as_str().is_some());
    assert!(chat["updated_at"].as_str().is_some());
    assert_eq!(chat["participants_source"], "database");
    assert_eq!(chat["participants_updated_at"], serde_json::Value::Null);
    assert_eq!(chat["participants_stale"], true);

    let one = app.get_json(&format!("/chats/{id}")).await;
    assert_eq!(one["name"], "Алгебра");
    assert_eq!(one["participants_count"], 31);
}

#[tokio::test]
async fn an_empty_table_still_has_one_page() {
    let app = TestApp::spawn().await;
    let page = app.get_json("/chats/all").await;
    assert_eq!(page["data"], serde_json::json!([]));
    assert_eq!(
        (page["total"].as_i64(), page["total_pages"].as_i64()),
        (Some(0), Some(1))
    );
}

#[tokio::test]
async fn limit_and_offset_are_clamped_as_the_legacy_service_did() {
    let app = TestApp::spawn().await;
    app.insert_numbered_chats(120, None).await;
    for (query, limit, rows) in [
        ("", 50, 50),
        ("?limit=", 50, 50),
        ("?limit=0", 50, 50),
        ("?limit=-5", 50, 50),
        ("?limit=7", 7, 7),
        ("?limit=500", 100, 100),
    ] {
        let page = app.get_json(&format!("/chats/all{query}")).await;
        assert_eq!(page["limit"], limit, "{query}");
        assert_eq!(page["data"].as_array().unwrap().len(), rows, "{query}");
        assert_eq!(page["total"], 120, "{query}");
    }
    let page = app.get_json("/chats/all?limit=50&offset=-10").await;
    assert_eq!(page["offset"], 0);
    let page = app.get_json("/chats/all?limit=50&offset=100").await;
    assert_eq!(page["data"].as_array().unwrap().len(), 20);
    assert_eq!(page["total_pages"], 3);
    let page = app.get_json("/chats/all?offset=5000").await;
    assert_eq!(page["data"], serde_json::json!([]));
    assert_eq!(page["total"], 120);

    for query in ["?limit=ten", "?offset=1.5", "?limit=9999999999999999999999"] {
        let response = app
            .get(&format!("/chats/all{query}"), Some(&app.admin()))
            .await;
        assert_eq!(response.status(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bad_request", "{query}");
    }
}

#[tokio::test]
async fn pages_do_not_overlap_and_cover_every_row() {
    let app = TestApp::spawn().await;
    // Equal names: only the id tie-breaker makes the order stable.
    for _ in 0..30 {
        app.insert_chat(NewChat {
            name: "same",
            ..NewChat::default()
        })
        .await;
    }
    let mut seen = Vec::new();
    for offset in (0..30).step_by(7) {
        let page = app
            .get_json(&format!("/chats/all?limit=7&offset={offset}"))
            .await;
        seen.extend(ids(&page));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen.len(), 30);
    assert_eq!(sorted.len(), 30);
}

#[tokio::test]
async fn sorting_follows_the_whitelist_with_postgres_null_order() {
    let app = TestApp::spawn().await;
    let b = app
        .insert_chat(NewChat {
            name: "b",
            participants_count: 5,
            department: Some("x"),
            ..NewChat::default()
        })
        .await;
    let a = app
        .insert_chat(NewChat {
            name: "a",
            participants_count: 9,
            department: None,
            ..NewChat::default()
        })
        .await;
    let c = app
        .insert_chat(NewChat {
            name: "c",
            participants_count: 1,
            department: Some("y"),
            ..NewChat::default()
        })
        .await;

    assert_eq!(
        ids(&app.get_json("/chats/all").await),
        [a, b, c].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json("/chats/all?sort_order=desc").await),
        [c, b, a].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json("/chats/all?sort_by=participants_count").await),
        [c, b, a].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json("/chats/all?sort_by=id&sort_order=desc").await),
        [c, a, b].map(i64::from)
    );
    // NULLs last ascending, first descending, as Postgres orders them by default.
    assert_eq!(
        ids(&app.get_json("/chats/all?sort_by=department").await),
        [b, c, a].map(i64::from)
    );
    assert_eq!(
        ids(&app
            .get_json("/chats/all?sort_by=department&sort_order=desc")
            .await),
        [a, c, b].map(i64::from)
    );
    // Off the whitelist: the default sort, never an error or an injection.
    assert_eq!(
        ids(&app
            .get_json("/chats/all?sort_by=name;drop%20table%20chats")
            .await),
        [a, b, c].map(i64::from)
    );
    assert_eq!(
        ids(&app
            .get_json("/chats/all?sort_by=university_id&sort_order=sideways")
            .await),
        [a, b, c].map(i64::from)
    );
}

#[tokio::test]
async fn every_search_word_must_match_some_column() {
    let app = TestApp::spawn().await;
    let math = app
        .insert_chat(NewChat {
            name: "Математика 2024",
            department: Some("Мехмат"),
            ..NewChat::default()
        })
        .await;
    let physics = app
        .insert_chat(NewChat {
            name: "Физика 2024",
            department: Some("Физфак"),
            ..NewChat::default()
        })
        .await;
    let registrar = app
        .insert_chat(NewChat {
            name: "Запись",
            max_chat_id: Some("-71234"),
            source: "bot_registrar",
            ..NewChat::default()
        })
        .await;

    let search = |q: &str| format!("/chats/all?search={}", urlencode(q));
    assert_eq!(
        ids(&app.get_json(&search("2024")).await),
        [math, physics].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json(&search("2024 мехмат")).await),
        [math].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json(&search("  МАТЕМАТИКА\t2024 ")).await),
        [math].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json(&search("-71234")).await),
        [registrar].map(i64::from)
    );
    assert_eq!(
        ids(&app.get_json(&search("registrar")).await),
        [registrar].map(i64::from)
    );
    let none = app.get_json(&search("2024 registrar")).await;
    assert_eq!(
        (none["total"].as_i64(), none["total_pages"].as_i64()),
        (Some(0), Some(1))
    );
    let both = app.get_json(&search("2024")).await;
    assert_eq!(both["total"], 2);
}

#[tokio::test]
async fn search_words_are_split_as_the_legacy_split_them() {
    let app = TestApp::spawn().await;
    let percent = app
        .insert_chat(NewChat {
            name: "скидка 50%",
            ..NewChat::default()
        })
        .await;
    let underscore = app
        .insert_chat(NewChat {
            name: "group_a",
            ..NewChat::default()
        })
        .await;
    let fifty = app
        .insert_chat(NewChat {
            name: "groupXa 50 and more",
            ..NewChat::default()
        })
        .await;
    let slash = app
        .insert_chat(NewChat {
            name: "back\\slash",
            ..NewChat::default()
        })
        .await;
    let ivt = app
        .insert_chat(NewChat {
            name: "ИВТ 21 поток",
            ..NewChat::default()
        })
        .await;

    // `50%` is the word `50`: every name with 50, not only the one with a literal `50%`.
    assert_eq!(
        ids(&app.get_json("/chats/all?search=50%25&sort_by=id").await),
        [percent, fifty].map(i64::from)
    );
    // `ИВТ-21` is `ИВТ` and `21`, wherever each occurs.
    assert_eq!(
        ids(&app
            .get_json(&format!("/chats/all?search={}", urlencode("ИВТ-21")))
            .await),
        [ivt].map(i64::from)
    );
    // `group_a` is `group` and `a`: both rows named group…a.
    assert_eq!(
        ids(&app.get_json("/chats/all?search=group_a&sort_by=id").await),
        [underscore, fifty].map(i64::from)
    );
    // `k\s` is `k` and `s`.
    assert_eq!(
        ids(&app.get_json("/chats/all?search=k%5Cs").await),
        [slash].map(i64::from)
    );
    // A search without words filters nothing.
    for nothing in ["%25", "_", "%5C", "--", "%25_%20"] {
        assert_eq!(
            app.get_json(&format!("/chats/all?search={nothing}")).await["total"],
            5,
            "{nothing}"
        );
    }
}

#[tokio::test]
async fn each_chat_carries_its_administrators_and_only_the_legacy_keys() {
    let app = TestApp::spawn().await;
    let with = app
        .insert_chat(NewChat {
            name: "with admins",
            department: Some(""),
            ..NewChat::default()
        })
        .await;
    let without = app
        .insert_chat(NewChat {
            name: "without",
            university_id: Some(4),
            department: Some("Мехмат"),
            ..NewChat::default()
        })
        .await;
    sqlx::query(
        "insert into administrators (chat_id, phone, max_id, add_user, add_admin, created_at, updated_at) values \
         ($1, '+79000000002', null, true, false, '2025-03-01 10:00:00+03', '2025-03-02 10:00:00+00'), \
         ($1, '+79000000001', '777', false, true, '2025-01-01 00:00:00.5+00', 'infinity')",
    )
    .bind(with)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("update chats set external_chat_id = 'x-1' where id = $1")
        .bind(with)
        .execute(&app.db)
        .await
        .unwrap();
    app.settle().await;

    let page = app.get_json("/chats/all?sort_by=id").await;
    let chat = &page["data"][0];
    assert_eq!(chat["id"], with);
    assert_eq!(chat["external_chat_id"], "x-1");
    assert!(chat.get("university_id").is_none(), "{chat}");
    assert!(
        chat.get("department").is_none(),
        "empty is left out: {chat}"
    );
    let admins = chat["administrators"].as_array().expect("an array");
    assert_eq!(admins.len(), 2);
    // Ordered by created_at: the second row inserted comes first.
    assert_eq!(admins[0]["phone"], "+79000000001");
    assert_eq!(admins[0]["max_id"], "777");
    assert_eq!(admins[0]["add_user"], false);
    assert_eq!(admins[0]["add_admin"], true);
    assert_eq!(admins[0]["chat_id"], with);
    assert_eq!(admins[0]["created_at"], "2025-01-01T00:00:00.500Z");
    assert_eq!(admins[0]["updated_at"], "9999-12-31T23:59:59.999999Z");
    assert_eq!(admins[1]["phone"], "+79000000002");
    assert_eq!(admins[1]["max_id"], "", "NULL is \"\"");
    assert_eq!(admins[1]["created_at"], "2025-03-01T07:00:00Z");
    let mut keys: Vec<&str> = admins[1]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "add_admin",
            "add_user",
            "chat_id",
            "created_at",
            "id",
            "max_id",
            "phone",
            "updated_at"
        ]
    );

    let other = &page["data"][1];
    assert_eq!(other["id"], without);
    assert_eq!(other["administrators"], serde_json::Value::Null);
    assert!(other.get("administrators").is_some(), "{other}");
    assert_eq!(other["university_id"], 4);
    assert_eq!(other["department"], "Мехмат");
    assert!(other.get("external_chat_id").is_none(), "{other}");

    // GET /chats/{id} is the same chat.
    let one = app.get_json(&format!("/chats/{with}")).await;
    assert_eq!(one["administrators"], chat["administrators"]);
}

#[tokio::test]
async fn totals_follow_inserts_deletes_and_moves_between_universities() {
    let app = TestApp::spawn().await;
    let ids = app.insert_numbered_chats(5, Some(1)).await;
    app.insert_numbered_chats(3, Some(2)).await;
    let curator = app.token("curator", Some(1));
    let total = |token: String| {
        let app = &app;
        async move {
            let response = app.get("/chats/all", Some(&token)).await;
            response.json::<serde_json::Value>().await.unwrap()["total"]
                .as_i64()
                .unwrap()
        }
    };
    assert_eq!(total(app.admin()).await, 8);
    assert_eq!(total(curator.clone()).await, 5);
    sqlx::query("delete from chats where id = $1")
        .bind(ids[0])
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("update chats set university_id = 2 where id = $1")
        .bind(ids[1])
        .execute(&app.db)
        .await
        .unwrap();
    sqlx::query("update chats set name = 'renamed' where id = $1")
        .bind(ids[2])
        .execute(&app.db)
        .await
        .unwrap();
    app.settle().await;
    assert_eq!(total(app.admin()).await, 7);
    assert_eq!(total(curator.clone()).await, 3);
    sqlx::query("truncate chats cascade")
        .execute(&app.db)
        .await
        .unwrap();
    app.settle().await;
    assert_eq!(total(app.admin()).await, 0);
}

#[tokio::test]
async fn a_single_chat_is_found_by_its_own_id_only() {
    let app = TestApp::spawn().await;
    let id = app.insert_chat(NewChat::default()).await;
    assert_eq!(
        app.get(&format!("/chats/{id}"), Some(&app.admin()))
            .await
            .status(),
        200
    );
    for (path, status) in [
        ("/chats/abc".to_owned(), 400),
        (format!("/chats/{}", id + 1000), 404),
        ("/chats/99999999999".to_owned(), 404),
        ("/chats/-70000000000001".to_owned(), 404),
    ] {
        let response = app.get(&path, Some(&app.admin())).await;
        assert_eq!(response.status(), status, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
}
