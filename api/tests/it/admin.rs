//! `POST /admin/participants/full-update` and `GET /admin/participants/validate`.

use std::time::Duration;

use chrono::Utc;
use shared::counts::{write_fenced, CachedCount};

use crate::helpers::{NewChat, TestApp};

async fn full_sweep_rows(app: &TestApp) -> Vec<(String, Option<String>)> {
    sqlx::query_as("select started_by, requested_by from sync_sweeps where kind = 'full'")
        .fetch_all(&app.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn only_a_super_admin_may_schedule_a_full_sweep() {
    let app = TestApp::spawn().await;
    for (token, status) in [
        (Some(app.token("curator", Some(1))), 403),
        (Some(app.token("operator", Some(1))), 403),
        (None, 401),
    ] {
        let response = app
            .post("/admin/participants/full-update", token.as_deref())
            .await;
        assert_eq!(response.status(), status);
        let response = app
            .get("/admin/participants/sweeps", token.as_deref())
            .await;
        assert_eq!(response.status(), status);
    }
    assert!(
        full_sweep_rows(&app).await.is_empty(),
        "refused requests leave no trace"
    );
    let response = app
        .post("/admin/participants/full-update", Some(&app.admin()))
        .await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "scheduled");
    assert_eq!(body["sweep"]["state"], "waiting");
    assert_eq!(body["sweep"]["started_by"], "admin");
    // The request is in Postgres, where syncd takes it; Redis is not needed for it.
    assert_eq!(full_sweep_rows(&app).await.len(), 1);
}

#[tokio::test]
async fn a_double_click_on_full_update_starts_one_sweep_and_answers_409_with_its_progress() {
    let app = TestApp::spawn().await;
    let admin = app.admin();
    let (first, second) = tokio::join!(
        app.post("/admin/participants/full-update", Some(&admin)),
        app.post("/admin/participants/full-update", Some(&admin)),
    );
    let mut statuses = [first.status().as_u16(), second.status().as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [202, 409]);
    let conflict = if first.status() == 409 { first } else { second };
    let body: serde_json::Value = conflict.json().await.unwrap();
    assert_eq!(body["error"]["code"], "sweep_running");
    assert_eq!(body["sweep"]["kind"], "full");
    assert_eq!(body["sweep"]["done"], 0);
    assert_eq!(full_sweep_rows(&app).await.len(), 1, "one sweep recorded");

    // While a replica runs it, the panel sees its progress, and a third click is refused too.
    sqlx::query(
        "update sync_sweeps set owner = 'syncd-a', lease_until = now() + interval '2 minutes', \
         planned = 200, done = 50, failed = 2, calls = 52 where kind = 'full'",
    )
    .execute(&app.db)
    .await
    .unwrap();
    let third = app
        .post("/admin/participants/full-update", Some(&admin))
        .await;
    assert_eq!(third.status(), 409);
    let listed = app.get_json("/admin/participants/sweeps").await;
    let sweep = &listed["sweeps"][0];
    assert_eq!(sweep["state"], "running");
    assert_eq!(sweep["owner"], "syncd-a");
    assert_eq!(sweep["progress"], 0.25);
    assert_eq!(sweep["calls"], 52);
    assert_eq!(sweep["errors"], 2);
    assert!(sweep["requested_by"].is_string());

    // Once it finished, the next click schedules a new one.
    sqlx::query("update sync_sweeps set finished_at = now(), done = 200 where kind = 'full'")
        .execute(&app.db)
        .await
        .unwrap();
    let again = app
        .post("/admin/participants/full-update", Some(&admin))
        .await;
    assert_eq!(again.status(), 202);
    let listed = app.get_json("/admin/participants/sweeps?limit=1").await;
    let states: Vec<&str> = listed["sweeps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["waiting"]);
    let bad = app
        .get("/admin/participants/sweeps?limit=many", Some(&admin))
        .await;
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn validation_reports_drift_between_redis_postgres_and_max() {
    let app = TestApp::spawn().await;
    let agree = app
        .insert_chat(NewChat {
            name: "agree",
            ..NewChat::default()
        })
        .await;
    let redis_off = app
        .insert_chat(NewChat {
            name: "redis off",
            ..NewChat::default()
        })
        .await;
    let never = app
        .insert_chat(NewChat {
            name: "never synced",
            ..NewChat::default()
        })
        .await;
    let now = Utc::now();
    app.record_sync(agree, 50, now).await;
    app.record_sync(redis_off, 60, now).await;
    let client = app.redis_client().await;
    let ttl = Duration::from_secs(3600);
    write_fenced(
        &client,
        &[(
            agree,
            CachedCount {
                count: 50,
                updated_at: now,
            },
        )],
        ttl,
    )
    .await
    .unwrap();
    write_fenced(
        &client,
        &[(
            redis_off,
            CachedCount {
                count: 59,
                updated_at: now,
            },
        )],
        ttl,
    )
    .await
    .unwrap();

    let forbidden = app
        .get(
            "/admin/participants/validate",
            Some(&app.token("curator", Some(1))),
        )
        .await;
    assert_eq!(forbidden.status(), 403);
    let bad = app
        .get(
            "/admin/participants/validate?sample_size=lots",
            Some(&app.admin()),
        )
        .await;
    assert_eq!(bad.status(), 400);

    let report = app
        .get_json("/admin/participants/validate?sample_size=10")
        .await;
    assert_eq!(report["sample_size"], 10);
    assert_eq!(report["with_max_answer"], 2);
    assert_eq!(report["in_redis"], 2);
    assert_eq!(report["redis_differs_from_max"], 1);
    assert_eq!(report["postgres_differs_from_max"], 0);
    assert_eq!(report["missing_in_redis"], 0);
    assert_eq!(report["redis_available"], true);
    let drift = report["drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1);
    assert_eq!(drift[0]["chat_id"], redis_off);
    assert_eq!(
        (drift[0]["redis"].as_i64(), drift[0]["max"].as_i64()),
        (Some(59), Some(60))
    );
    let _ = never;
    // Clamped, not refused.
    assert_eq!(
        app.get_json("/admin/participants/validate?sample_size=5000")
            .await["sample_size"],
        1000
    );
}
