//! Token validation and role scoping.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::helpers::{ids, token_with, NewChat, TestApp, JWT_SECRET};

async fn status_and_code(app: &TestApp, path: &str, header: Option<&str>) -> (u16, String) {
    let mut request = app.http.get(app.url(path));
    if let Some(header) = header {
        request = request.header("authorization", header);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

fn unsigned_token(claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthorized() {
    let app = TestApp::spawn().await;
    app.insert_chat(NewChat::default()).await;
    let now = chrono::Utc::now().timestamp();
    let expired = token_with(JWT_SECRET, "super_admin", None, now - 3600);
    let wrong_signature = token_with(
        "someone-elses-secret-0123456789",
        "super_admin",
        None,
        now + 3600,
    );
    let alg_none =
        unsigned_token(serde_json::json!({"sub": "1", "role": "super_admin", "exp": now + 3600}));
    let valid = app.admin();
    let tampered = {
        // A valid signature over different claims.
        let parts: Vec<&str> = valid.split('.').collect();
        let claims = URL_SAFE_NO_PAD.encode(
            serde_json::json!({"sub": "1", "role": "super_admin", "exp": now + 7200}).to_string(),
        );
        format!("{}.{}.{}", parts[0], claims, parts[2])
    };
    for (what, header) in [
        ("no header", None),
        ("empty bearer", Some("Bearer ".to_owned())),
        ("basic auth", Some("Basic dXNlcjpwYXNz".to_owned())),
        ("raw token without Bearer", Some(valid.clone())),
        ("malformed", Some("Bearer abc.def".to_owned())),
        ("garbage", Some("Bearer !!!".to_owned())),
        ("expired", Some(format!("Bearer {expired}"))),
        ("wrong signature", Some(format!("Bearer {wrong_signature}"))),
        ("alg none", Some(format!("Bearer {alg_none}"))),
        ("tampered claims", Some(format!("Bearer {tampered}"))),
    ] {
        for path in ["/chats/all", "/chats/1"] {
            assert_eq!(
                status_and_code(&app, path, header.as_deref()).await,
                (401, "unauthorized".to_owned()),
                "{what} on {path}"
            );
        }
    }
    let response = app.get("/chats/all", None).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(
        status_and_code(&app, "/chats/all", Some(&format!("Bearer {valid}")))
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn an_unknown_role_is_forbidden() {
    let app = TestApp::spawn().await;
    for role in ["superadmin", "student", ""] {
        let token = app.token(role, Some(1));
        assert_eq!(
            status_and_code(&app, "/chats/all", Some(&format!("Bearer {token}"))).await,
            (403, "forbidden".to_owned()),
            "{role:?}"
        );
    }
}

#[tokio::test]
async fn curators_and_operators_see_only_their_university() {
    let app = TestApp::spawn().await;
    let mine = app
        .insert_chat(NewChat {
            name: "mine",
            university_id: Some(1),
            ..NewChat::default()
        })
        .await;
    let theirs = app
        .insert_chat(NewChat {
            name: "theirs",
            university_id: Some(2),
            ..NewChat::default()
        })
        .await;
    let nobodys = app
        .insert_chat(NewChat {
            name: "nobody's",
            university_id: None,
            ..NewChat::default()
        })
        .await;

    let list = |token: String| {
        let app = &app;
        async move {
            let response = app.get("/chats/all", Some(&token)).await;
            assert_eq!(response.status(), 200);
            let page: serde_json::Value = response.json().await.unwrap();
            (ids(&page), page["total"].as_i64().unwrap())
        }
    };
    assert_eq!(
        list(app.admin()).await,
        (
            vec![i64::from(mine), i64::from(nobodys), i64::from(theirs)],
            3
        )
    );
    for role in ["curator", "operator"] {
        assert_eq!(
            list(app.token(role, Some(1))).await,
            (vec![i64::from(mine)], 1),
            "{role}"
        );
        // Without a university_id a curator or operator sees nothing, not everything.
        assert_eq!(
            list(app.token(role, None)).await,
            (vec![], 0),
            "{role} without university"
        );

        let token = app.token(role, Some(1));
        assert_eq!(
            app.get(&format!("/chats/{mine}"), Some(&token))
                .await
                .status(),
            200
        );
        assert_eq!(
            app.get(&format!("/chats/{theirs}"), Some(&token))
                .await
                .status(),
            404
        );
        assert_eq!(
            app.get(&format!("/chats/{nobodys}"), Some(&token))
                .await
                .status(),
            404
        );
        let unscoped = app.token(role, None);
        assert_eq!(
            app.get(&format!("/chats/{mine}"), Some(&unscoped))
                .await
                .status(),
            404
        );
        // Refreshing outside the scope is 404 too, not a way to probe other universities.
        assert_eq!(
            app.post(
                &format!("/chats/{theirs}/refresh-participants"),
                Some(&token)
            )
            .await
            .status(),
            404
        );
    }
    // Search stays inside the scope.
    let token = app.token("curator", Some(2));
    let response = app.get("/chats/all?search=mine", Some(&token)).await;
    let page: serde_json::Value = response.json().await.unwrap();
    assert_eq!(page["total"], 0);
}
