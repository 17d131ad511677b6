//! The MAX Bot API client: the only place a MAX path or header is spelled.
//!
//! One call per chat (`GET /chats/{chatId}`); the batch endpoint was retired in June 2026.
//! Membership events: `GET /updates` (long polling) and `GET/POST/DELETE /subscriptions`
//! (the webhook). Errors are sorted by what the caller should do about them.

use std::time::Duration;

use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
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
    /// An answer that is not the chat asked for: a 400 or another 4xx, a body that is not a
    /// chat (an HTML page of a proxy or a captive portal, bad JSON, no `participants_count`,
    /// another chat's id, a negative count), or one over `MAX_BODY_BYTES`. Not retried; a
    /// failure of the chat, and of the setup when every chat gets it.
    #[error("unexpected MAX answer ({kind}): {detail}")]
    Unexpected { kind: &'static str, detail: String },
}

impl MaxError {
    /// A short label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            MaxError::RateLimited => "rate_limited",
            MaxError::Transient(kind) => kind,
            MaxError::InvalidToken => "invalid_token",
            MaxError::ChatUnavailable(kind) => kind,
            MaxError::Unexpected { kind, .. } => kind,
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

    /// `GET /chats/{chatId}` with the raw token in `Authorization`. A success is a chat only when
    /// its body parses, names the chat asked for and has a count of at least 0.
    pub async fn get_chat(&self, chat_id: MaxChatId) -> Result<MaxChat, MaxError> {
        let mut request = self
            .http
            .get(format!("{}/chats/{chat_id}", self.base_url))
            .header(reqwest::header::AUTHORIZATION, self.token.expose_secret());
        if let Some(traceparent) = shared::telemetry::current_traceparent() {
            request = request.header("traceparent", traceparent);
        }
        let mut response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        let body = read_capped(&mut response).await?;
        if status.is_success() {
            return parse_chat(chat_id, &body);
        }
        let code = serde_json::from_slice::<ErrorBody>(&body)
            .map(|body| body.code)
            .unwrap_or_default();
        Err(classify(status, &code))
    }
}

/// One answer of `GET /updates`: the raw updates, and the marker to send next.
#[derive(Debug, Deserialize)]
pub struct UpdateBatch {
    #[serde(default)]
    pub updates: Vec<serde_json::Value>,
    pub marker: Option<i64>,
}

/// A webhook subscription as `GET /subscriptions` lists it.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Subscription {
    pub url: String,
    /// When it was made (unix ms).
    #[serde(default)]
    pub time: i64,
    /// `null`: every update type.
    #[serde(default)]
    pub update_types: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Subscriptions {
    #[serde(default)]
    subscriptions: Vec<Subscription>,
}

#[derive(Deserialize)]
struct Success {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    message: Option<String>,
}

/// The `kind` of the error `GET /updates` answers while a webhook subscription is active
/// (405: MAX does not long-poll then).
pub const WEBHOOK_ACTIVE: &str = "webhook_active";

impl MaxClient {
    /// `GET /updates` (long polling) for `types` (comma-separated, as the schema's `style:
    /// simple` asks); `marker: None` only on the first poll ever (MAX then answers only the
    /// newest update). The request may take `timeout` plus the usual call timeout.
    pub async fn get_updates(
        &self,
        marker: Option<i64>,
        types: &[&str],
        limit: u32,
        timeout: Duration,
        call_timeout: Duration,
    ) -> Result<UpdateBatch, MaxError> {
        let mut query = vec![
            ("types", types.join(",")),
            ("limit", limit.to_string()),
            ("timeout", timeout.as_secs().to_string()),
        ];
        if let Some(marker) = marker {
            query.push(("marker", marker.to_string()));
        }
        let request = self
            .http
            .get(self.url_with("/updates", &query)?)
            .timeout(timeout + call_timeout);
        let body = self.send(request).await.map_err(|error| match error {
            MaxError::Unexpected { detail, .. } if detail.starts_with("HTTP 405") => {
                MaxError::Unexpected {
                    kind: WEBHOOK_ACTIVE,
                    detail,
                }
            }
            error => error,
        })?;
        serde_json::from_slice(&body).map_err(|e| MaxError::Unexpected {
            kind: "not_updates",
            detail: format!("not an update list: {e}; body starts {:?}", excerpt(&body)),
        })
    }

    /// `GET /subscriptions`.
    pub async fn subscriptions(&self) -> Result<Vec<Subscription>, MaxError> {
        let request = self.http.get(format!("{}/subscriptions", self.base_url));
        let body = self.send(request).await?;
        serde_json::from_slice::<Subscriptions>(&body)
            .map(|list| list.subscriptions)
            .map_err(|e| MaxError::Unexpected {
                kind: "not_subscriptions",
                detail: format!("{e}; body starts {:?}", excerpt(&body)),
            })
    }

    /// `POST /subscriptions`: the webhook `url` for `types`, with the `secret` MAX sends back
    /// in `X-Max-Bot-Api-Secret`.
    pub async fn subscribe(
        &self,
        url: &str,
        types: &[&str],
        secret: &SecretString,
    ) -> Result<(), MaxError> {
        let body = serde_json::json!({
            "url": url,
            "update_types": types,
            "secret": secret.expose_secret(),
        });
        let request = self
            .http
            .post(format!("{}/subscriptions", self.base_url))
            .json(&body);
        succeeded(&self.send(request).await?)
    }

    /// `DELETE /subscriptions?url=`.
    pub async fn unsubscribe(&self, url: &str) -> Result<(), MaxError> {
        let request = self
            .http
            .delete(self.url_with("/subscriptions", &[("url", url.to_owned())])?);
        succeeded(&self.send(request).await?)
    }

    /// `path` under the base URL with the query parameters `query`, encoded.
    fn url_with(&self, path: &str, query: &[(&str, String)]) -> Result<reqwest::Url, MaxError> {
        reqwest::Url::parse_with_params(&format!("{}{path}", self.base_url), query).map_err(|e| {
            MaxError::Unexpected {
                kind: "bad_request",
                detail: format!("cannot build the URL: {e}"),
            }
        })
    }

    /// Sends with the token; a 2xx body, or the error sorted as `classify` does.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<Vec<u8>, MaxError> {
        let request = request.header(reqwest::header::AUTHORIZATION, self.token.expose_secret());
        let mut response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        let body = read_capped(&mut response).await?;
        if status.is_success() {
            return Ok(body);
        }
        let code = serde_json::from_slice::<ErrorBody>(&body)
            .map(|body| body.code)
            .unwrap_or_default();
        Err(classify(status, &code))
    }
}

/// `{"success": true}`, or MAX's message.
fn succeeded(body: &[u8]) -> Result<(), MaxError> {
    match serde_json::from_slice::<Success>(body) {
        Ok(Success { success: true, .. }) => Ok(()),
        Ok(Success { message, .. }) => Err(MaxError::Unexpected {
            kind: "refused",
            detail: message.unwrap_or_else(|| "success: false".to_owned()),
        }),
        Err(e) => Err(MaxError::Unexpected {
            kind: "not_a_result",
            detail: format!("{e}; body starts {:?}", excerpt(body)),
        }),
    }
}

/// The most of a body that is read: a chat's JSON is a few kilobytes (without `participants`,
/// which is not relied on, it is under one); a larger body is not read whole.
pub const MAX_BODY_BYTES: usize = 1 << 20;

fn transport_error(error: &reqwest::Error) -> MaxError {
    if error.is_timeout() {
        MaxError::Transient("timeout")
    } else {
        MaxError::Transient("connection")
    }
}

/// Reads the body up to `MAX_BODY_BYTES`, chunk by chunk.
async fn read_capped(response: &mut reqwest::Response) -> Result<Vec<u8>, MaxError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(MaxError::Unexpected {
                kind: "body_too_large",
                detail: format!("answer body over {MAX_BODY_BYTES} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A 2xx body as the chat asked for, or why it is not one (with the first bytes of the body,
/// which tell a proxy's page from a changed schema).
pub fn parse_chat(asked: MaxChatId, body: &[u8]) -> Result<MaxChat, MaxError> {
    let not_a_chat = |why: String| MaxError::Unexpected {
        kind: "not_a_chat",
        detail: format!("{why}; body starts {:?}", excerpt(body)),
    };
    let chat: MaxChat =
        serde_json::from_slice(body).map_err(|e| not_a_chat(format!("not a chat: {e}")))?;
    if chat.chat_id != asked.get() {
        return Err(not_a_chat(format!(
            "answer is for chat {}, asked for {asked}",
            chat.chat_id
        )));
    }
    if chat.participants_count < 0 {
        return Err(not_a_chat(format!(
            "negative participants_count {}",
            chat.participants_count
        )));
    }
    Ok(chat)
}

/// Up to 120 characters of a body, for a log line.
fn excerpt(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(120)]).into_owned()
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
        status => MaxError::Unexpected {
            kind: "bad_request",
            detail: format!("HTTP {} {code}", status.as_u16()),
        },
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
            MaxError::Unexpected { .. }
        ));
    }

    #[test]
    fn a_body_that_is_not_the_chat_asked_for_is_unexpected() {
        let asked = MaxChatId::parse("-70000000000005").unwrap();
        let kind = |body: &str| match parse_chat(asked, body.as_bytes()) {
            Err(MaxError::Unexpected { kind, detail }) => Some((kind, detail)),
            _ => None,
        };
        let (kind_html, detail) = kind("<html><body>Please log in</body></html>").unwrap();
        assert_eq!(kind_html, "not_a_chat");
        assert!(detail.contains("<html>"), "{detail}");
        assert!(kind(r#"{"chat_id":-70000000000005,"status":"active"}"#).is_some());
        assert!(kind(r#"{"chat_id":-1,"status":"active","participants_count":3}"#).is_some());
        assert!(
            kind(r#"{"chat_id":-70000000000005,"status":"active","participants_count":-3}"#)
                .is_some()
        );
        assert!(parse_chat(
            asked,
            br#"{"chat_id":-70000000000005,"status":"active","participants_count":0}"#
        )
        .is_ok());
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
