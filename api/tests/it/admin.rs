//! `POST /admin/participants/full-update` and `GET /admin/participants/validate`.

use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use shared::counts::{write_fenced, CachedCount};

use crate::helpers::{NewChat, TestApp};

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
    }
    let client = app.redis_client().await;
    let requested: Option<i64> = client.get(shared::keys::FULL_SWEEP_REQUEST).await.unwrap();
    assert_eq!(requested, None, "refused requests leave no trace");
    let response = app
        .post("/admin/participants/full-update", Some(&app.admin()))
        .await;
    assert_eq!(response.status(), 202);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "scheduled");
    let requested: Option<i64> = client.get(shared::keys::FULL_SWEEP_REQUEST).await.unwrap();
    assert!(requested.is_some());
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
