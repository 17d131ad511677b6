//! The webhook receiver (`MAX_UPDATES_MODE=webhook`): `POST /max/updates` on its own listener,
//! `SYNCD_WEBHOOK_ADDR`, never the api's port nor syncd's metrics port.
//!
//! MAX counts anything but 200 within 30 s as a failed delivery and retries it for about 8
//! hours (MAX_EVENTS.md §1.3), so the answer is 200 only once the raw update is in a Redis
//! stream, and 503 when it cannot be stored. Nothing is processed inside the request: the
//! events consumer (`super::intake`) reads the stream.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use fred::prelude::*;
use secrecy::{ExposeSecret, SecretString};
use shared::keys;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::update::Update;
use crate::metrics::Metrics;
use crate::stream::redis::add_dead_letter;

/// The path MAX posts to (the ingress maps `https://<host>/max/updates` on 443 to it).
pub const PATH: &str = "/max/updates";

/// The header MAX sends the subscription's secret in.
pub const SECRET_HEADER: &str = "x-max-bot-api-secret";

/// Largest body taken. Membership updates are well under a kilobyte; 64 KiB leaves room for
/// any update type another subscription might send.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Entries the events stream keeps (about: trimmed with `MAXLEN ~` on each add). The consumer
/// reads them within seconds, and a replica that receives also consumes, so the bound only
/// matters when consumers are stuck while receivers run: at MAX's default cap of 100 updates a
/// second it holds about 16 minutes, at a busy membership rate of a few a second many hours,
/// in about 40 MB (updates of ~400 bytes).
pub const STREAM_MAX_LEN: i64 = 100_000;

/// The longest a request waits for Redis before answering 503 (MAX waits 30 s).
const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the receiver needs.
pub struct Receiver {
    pub redis: Client,
    pub secret: SecretString,
    pub metrics: Metrics,
    /// A streak of bodies that are not updates is logged once, at its start.
    not_updates: AtomicBool,
    /// A streak of updates Redis could not store is logged once, at its start.
    unstored: AtomicBool,
}

impl Receiver {
    pub fn new(redis: Client, secret: SecretString, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            redis,
            secret,
            metrics,
            not_updates: AtomicBool::new(false),
            unstored: AtomicBool::new(false),
        })
    }

    fn reject(&self, reason: &str, status: StatusCode) -> StatusCode {
        self.metrics
            .events_rejected
            .with_label_values(&[reason])
            .inc();
        status
    }

    /// Whether the request carries the secret, compared in constant time.
    fn authenticated(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers.get(SECRET_HEADER) else {
            return false;
        };
        let expected = self.secret.expose_secret().as_bytes();
        bool::from(given.as_bytes().ct_eq(expected))
    }
}

pub fn router(receiver: Arc<Receiver>) -> Router {
    Router::new()
        .route(PATH, post(receive_update))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(receiver)
}

/// Serves the receiver on `listener` until `cancel`, then lets requests in flight finish.
pub async fn serve(listener: TcpListener, receiver: Arc<Receiver>, cancel: CancellationToken) {
    let served = axum::serve(listener, router(receiver))
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await;
    if let Err(error) = served {
        tracing::error!(error = %error, "the webhook receiver failed");
    }
}

async fn receive_update(
    State(receiver): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> StatusCode {
    if !receiver.authenticated(&headers) {
        return receiver.reject("unauthorized", StatusCode::UNAUTHORIZED);
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return receiver.reject("too_large", StatusCode::PAYLOAD_TOO_LARGE);
        }
        Err(rejection) => return rejection.status(),
    };
    let received_at = chrono::Utc::now().timestamp_millis().to_string();
    let update = match Update::parse(&body) {
        Ok(_) => String::from_utf8_lossy(&body).into_owned(),
        Err(error) => {
            // MAX would only retry it: answered 200, kept for an operator.
            keep_not_an_update(&receiver, &body, &error.to_string(), received_at).await;
            return receiver.reject("not_an_update", StatusCode::OK);
        }
    };
    receiver.not_updates.store(false, Ordering::Relaxed);
    let fields = vec![
        (keys::EVENTS_FIELD_UPDATE.to_owned(), update),
        ("received_at".to_owned(), received_at),
    ];
    let add = async {
        let id: Result<String, fred::error::Error> = receiver
            .redis
            .xadd(
                keys::EVENTS_STREAM,
                false,
                ("MAXLEN", "~", STREAM_MAX_LEN),
                "*",
                fields,
            )
            .await;
        id
    };
    let stored = tokio::time::timeout(STORE_TIMEOUT, add).await;
    match stored {
        Ok(Ok(_)) => {
            receiver
                .metrics
                .events_received
                .with_label_values(&["webhook"])
                .inc();
            if receiver.unstored.swap(false, Ordering::Relaxed) {
                tracing::info!("MAX updates are stored again");
            }
            StatusCode::OK
        }
        Ok(Err(error)) => unstored(&receiver, &error.to_string()),
        Err(_) => unstored(&receiver, "timed out"),
    }
}

/// 503, so that MAX delivers the update again later; the first of a streak is logged.
fn unstored(receiver: &Receiver, error: &str) -> StatusCode {
    if receiver.unstored.swap(true, Ordering::Relaxed) {
        tracing::debug!(error, "another MAX update not stored");
    } else {
        tracing::warn!(error, "cannot store MAX updates in Redis; answering 503 so that MAX retries them (logged once until one is stored)");
    }
    receiver.reject("unavailable", StatusCode::SERVICE_UNAVAILABLE)
}

/// Dead-letters an authenticated body that is not an update; the first of a streak is logged.
async fn keep_not_an_update(receiver: &Receiver, body: &[u8], detail: &str, received_at: String) {
    if receiver.not_updates.swap(true, Ordering::Relaxed) {
        tracing::debug!(detail, "another webhook body that is not a MAX update");
    } else {
        tracing::warn!(
            detail,
            "a webhook body with the right secret is not a MAX update; answered 200 and dead-lettered (logged once until an update arrives)"
        );
    }
    let fields = vec![
        (
            keys::EVENTS_FIELD_UPDATE.to_owned(),
            String::from_utf8_lossy(body).into_owned(),
        ),
        ("source".to_owned(), "webhook".to_owned()),
        ("reason".to_owned(), "not_an_update".to_owned()),
        ("detail".to_owned(), detail.to_owned()),
        ("received_at".to_owned(), received_at),
    ];
    let kept = tokio::time::timeout(
        STORE_TIMEOUT,
        add_dead_letter(&receiver.redis, keys::EVENTS_STREAM_DEAD, fields),
    )
    .await;
    if !matches!(kept, Ok(Ok(()))) {
        tracing::debug!("could not dead-letter a webhook body that is not an update");
    }
}
