//! A search's work is bounded: a curator's search compares only their university's chats, a
//! search past its scan budget is refused with 422, and one caller's costly searches are rated.

use api::auth::{sign, Claims};
use secrecy::SecretString;
use serde_json::Value as Json;

use crate::helpers::{metric, TestApp, JWT_SECRET};

/// Inserts `n` chats of `university_id` whose names are `name_len` characters long.
async fn insert_chats(app: &TestApp, n: i32, university_id: i32, name_len: i32) {
    sqlx::query(
        "insert into chats (name, url, max_chat_id, participants_count, university_id, source) \
         select 'chat ' || g || ' ' || repeat('ж', $3), 'https://max.ru/join/' || $2 || '-' || g, \
                (-70000000000000 - g)::text, 10, $2, 'admin_panel' \
         from generate_series(1, $1) g",
    )
    .bind(n)
    .bind(university_id)
    .bind(name_len)
    .execute(&app.db)
    .await
    .unwrap();
}

async fn wait_for_total(app: &TestApp, total: i64) {
    crate::helpers::eventually(std::time::Duration::from_secs(20), || async {
        app.get_json("/chats/all?limit=1").await["total"] == total
    })
    .await;
}

fn token_of(sub: &str, role: &str, university_id: Option<i64>) -> String {
    sign(
        &SecretString::from(JWT_SECRET.to_owned()),
        &Claims {
            sub: sub.into(),
            role: role.into(),
            exp: chrono::Utc::now().timestamp() + 3600,
            university_id,
            branch_id: None,
            faculty_id: None,
        },
    )
    .unwrap()
}

#[tokio::test]
async fn a_search_past_its_scan_budget_is_refused_and_a_curators_compares_only_their_university() {
    let app = TestApp::spawn_with(|args| args.search_scan_budget_mb = 1).await;
    // About 2.4 MB of names in university 1, a few chats in university 2.
    insert_chats(&app, 1200, 1, 1000).await;
    insert_chats(&app, 5, 2, 10).await;
    wait_for_total(&app, 1205).await;

    // A two-letter word has no trigram: every chat's text must be compared with it.
    let admin = app.get("/chats/all?search=zq", Some(&app.admin())).await;
    assert_eq!(admin.status(), 422);
    let body: Json = admin.json().await.unwrap();
    assert_eq!(body["error"]["code"], "search_too_broad");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("longer words"),
        "{body}"
    );
    assert_eq!(
        metric(
            &app.metrics().await,
            "participants_costly_searches_total{outcome=\"over_budget\"}"
        ),
        1.0
    );

    // The curator's same search compares only their five chats.
    let curator = app.token("curator", Some(2));
    let page = app.get("/chats/all?search=zq", Some(&curator)).await;
    assert_eq!(page.status(), 200);
    let found = app.get("/chats/all?search=hat%203", Some(&curator)).await;
    assert_eq!(found.status(), 200);
    let found: Json = found.json().await.unwrap();
    assert_eq!(found["total"], 1, "chat 3 of university 2 alone: {found}");
    assert_eq!(found["data"][0]["university_id"], 2);
    // A deep page of the curator's chats is theirs, in order.
    let deep = app
        .get("/chats/all?sort_by=id&offset=3&limit=10", Some(&curator))
        .await
        .json::<Json>()
        .await
        .unwrap();
    assert_eq!(
        (
            deep["total"].clone(),
            deep["data"].as_array().unwrap().len()
        ),
        (5.into(), 2)
    );
    assert!(deep["data"][0]["id"].as_i64() < deep["data"][1]["id"].as_i64());
}

#[tokio::test]
async fn one_callers_costly_searches_are_rated_and_other_callers_and_cheap_searches_are_not() {
    let app = TestApp::spawn_with(|args| args.costly_searches_per_user_per_minute = 2).await;
    insert_chats(&app, 21_000, 1, 0).await;
    wait_for_total(&app, 21_000).await;
    let greedy = token_of("greedy", "super_admin", None);
    // Each a new two-character word: not cached, so every chat must be compared.
    for word in ["q1", "q2"] {
        let response = app
            .get(&format!("/chats/all?search={word}"), Some(&greedy))
            .await;
        assert_eq!(response.status(), 200, "{word}");
    }
    let refused = app.get("/chats/all?search=q3", Some(&greedy)).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Json = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    // A cached word, a rare word and a plain page are cheap: still served to the same caller.
    for path in [
        "/chats/all?search=q1",
        "/chats/all?search=20999",
        "/chats/all?offset=20000",
    ] {
        assert_eq!(app.get(path, Some(&greedy)).await.status(), 200, "{path}");
    }
    let other = token_of("other", "super_admin", None);
    assert_eq!(
        app.get("/chats/all?search=q3", Some(&other)).await.status(),
        200
    );
    let metrics = app.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "participants_costly_searches_total{outcome=\"rate_limited\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "participants_costly_searches_total{outcome=\"served\"}"
        ),
        3.0
    );
}
