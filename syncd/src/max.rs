//! The MAX Bot API client: the only place a MAX path or header is spelled.
//!
//! One call per chat (`GET /chats/{chatId}`); the batch endpoint was retired in June 2026.
//! Errors are sorted by what the caller should do about them.

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use shared::ids::MaxChatId;

/// The fields of MAX's `Chat` that this service reads; every other field is ignored.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct MaxChat {
    pub chat_id: i64,
    /// active, removed (bot removed), left (bot left), closed, or something newer
    pub status: String,
    pub participants_count: i32,
}

impl MaxChat {
    pub fn is_active(&self) -> bool {
        self.status == "active"
    }
}

/// A failed call, by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum MaxError {
    /// 429: slow the whole fleet down, then retry.
    #[error("rate limited by MAX")]
    RateLimited,
    /// 5xx, a timeout or a connection failure: retry with backoff.
    #[error("MAX unavailable: {0}")]
    Transient(&'static str),
    /// 401, or 403 `verify.token`: stop calling until the token is fixed.
    #[error("MAX rejected the bot token")]
    InvalidToken,
    /// 403 or 404 for this chat: mark it and skip it until the recheck period passes.
    #[error("chat unavailable to the bot: {0}")]
    ChatUnavailable(&'static str),
    /// Anything else (400, an unparsable body): a bug on one side; not retried.
    #[error("unexpected MAX answer: {0}")]
    Unexpected(String),
}

impl MaxError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MaxError::RateLimited => "rate_limited",
            MaxError::Transient(kind) => kind,
            MaxError::InvalidToken => "invalid_token",
            MaxError::ChatUnavailable(kind) => kind,
            MaxError::Unexpected(_) => "unexpected",
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: String,
}

#[derive(Clone)]
pub struct MaxClient {
    http: reqwest::Client,
    base_url: String,
    token: SecretString,
}

impl MaxClient {
    pub fn new(base_url: &str, token: SecretString, timeout: Duration) -> anyhow::Result<Self> {
        shared::tls::init();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("participants-syncd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// `GET /chats/{chatId}` with the raw token in `Authorization`.
    pub async fn get_chat(&self, chat_id: MaxChatId) -> Result<MaxChat, MaxError> {
        let mut request = self
            .http
            .get(format!("{}/chats/{chat_id}", self.base_url))
            .header(reqwest::header::AUTHORIZATION, self.token.expose_secret());
        if let Some(traceparent) = shared::telemetry::current_traceparent() {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                MaxError::Transient("timeout")
            } else {
                MaxError::Transient("connection")
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return response.json::<MaxChat>().await.map_err(|e| {
                if e.is_timeout() {
                    MaxError::Transient("timeout")
                } else {
                    MaxError::Unexpected(format!("unreadable chat body: {e}"))
                }
            });
        }
        let code = response
            .json::<ErrorBody>()
            .await
            .map(|body| body.code)
            .unwrap_or_default();
        Err(classify(status, &code))
    }
}

/// Sorts a non-2xx answer. An invalid token has been seen as 401 and as 403 `verify.token`.
pub fn classify(status: StatusCode, code: &str) -> MaxError {
    match status {
        StatusCode::TOO_MANY_REQUESTS => MaxError::RateLimited,
        StatusCode::UNAUTHORIZED => MaxError::InvalidToken,
        StatusCode::FORBIDDEN if code == "verify.token" => MaxError::InvalidToken,
        StatusCode::FORBIDDEN => MaxError::ChatUnavailable("forbidden"),
        StatusCode::NOT_FOUND => MaxError::ChatUnavailable("not_found"),
        status if status.is_server_error() => MaxError::Transient("server_error"),
        status => MaxError::Unexpected(format!("HTTP {} {code}", status.as_u16())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_sorted_by_what_to_do() {
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, ""),
            MaxError::RateLimited
        ));
        assert!(matches!(
            classify(StatusCode::UNAUTHORIZED, ""),
            MaxError::InvalidToken
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "verify.token"),
            MaxError::InvalidToken
        ));
        assert!(matches!(
            classify(StatusCode::FORBIDDEN, "chat.denied"),
            MaxError::ChatUnavailable("forbidden")
        ));
        assert!(matches!(
            classify(StatusCode::NOT_FOUND, ""),
            MaxError::ChatUnavailable("not_found")
        ));
        assert!(matches!(
            classify(StatusCode::BAD_GATEWAY, ""),
            MaxError::Transient(_)
        ));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, "proto.payload"),
            MaxError::Unexpected(_)
        ));
    }

    #[test]
    fn unknown_chat_fields_are_ignored() {
        let chat: MaxChat = serde_json::from_str(
            r#"{"chat_id":-70000000000005,"type":"chat","status":"active","title":"t","icon":null,
                "last_event_time":1775628268494,"participants_count":3,"is_public":false,
                "description":null,"participants":{"1":2},"brand_new_field":[1,2]}"#,
        )
        .unwrap();
        assert_eq!(
            chat,
            MaxChat {
                chat_id: -70000000000005,
                status: "active".into(),
                participants_count: 3
            }
        );
    }
}
