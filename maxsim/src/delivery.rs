//! Webhook delivery as MAX does it (`MAX_EVENTS.md` §1.3): `POST/GET/DELETE /subscriptions`,
//! and a POST of each event (one bare Update) to each subscribed URL with
//! `X-Max-Bot-Api-Secret`. Only an answer of exactly 200 within `webhook_timeout_secs` counts;
//! any other answer is retried after 60 s, then ×2.5 each time (each event on its own
//! schedule), at most 10 times and never past 8 h after the event; a subscription whose
//! deliveries failed for 8 h is removed. At most `webhook_max_per_sec` POSTs start in a second.
//!
//! Deviation: MAX accepts only `https://` on port 443; with `allow_http_loopback_webhooks` (the
//! default) the simulator also accepts `http://` to a loopback host on any port, since tests
//! have no TLS.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;

use crate::events::Outgoing;
use crate::{admit_into, error, now_ms, Simulator};

/// A webhook subscription as `GET /subscriptions` shows it (the secret is never shown).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Subscription {
    pub url: String,
    /// When it was made, unix ms.
    pub time: i64,
    pub update_types: Option<Vec<String>>,
}

struct Subscribed {
    id: u64,
    view: Subscription,
    secret: Option<String>,
    /// Since when every delivery to it failed; cleared by a 200.
    failing_since: Option<Instant>,
}

/// One POST of an event to a subscription, as `GET /_sim/deliveries` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeliveryAttempt {
    /// The event's `seq` (`GET /_sim/events`).
    pub seq: u64,
    pub url: String,
    /// 0 for the first try, then the retry's number.
    pub retry: u32,
    /// Whether this is the injected second copy of the event.
    pub duplicate: bool,
    /// When the POST started, unix ms.
    pub at_ms: i64,
    /// The HTTP status answered, if any.
    pub status: Option<u16>,
    /// `ok`, `status`, `timeout` or `error` (no answer).
    pub outcome: String,
}

/// What delivery did: every attempt, the events given up, the subscriptions removed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeliveryLog {
    pub subscriptions: Vec<Subscription>,
    pub attempts: Vec<DeliveryAttempt>,
    /// `(seq, url)` of each event copy given up.
    pub given_up: Vec<(u64, String)>,
    /// The URLs removed because their deliveries failed for `webhook_give_up_secs`.
    pub unsubscribed: Vec<String>,
}

#[derive(Default)]
pub(crate) struct Delivery {
    subscriptions: Vec<Subscribed>,
    next_id: u64,
    log: DeliveryLog,
    window: VecDeque<Instant>,
    outbox: Option<mpsc::UnboundedSender<Outgoing>>,
    inbox: Option<mpsc::UnboundedReceiver<Outgoing>>,
}

impl Delivery {
    pub(crate) fn has_subscriptions(&self) -> bool {
        !self.subscriptions.is_empty()
    }

    /// Hands a copy to the dispatcher (`run_dispatcher`), which holds it until `not_before`.
    pub(crate) fn send(&mut self, outgoing: Outgoing) {
        if self.outbox.is_none() {
            let (sender, receiver) = mpsc::unbounded_channel();
            self.outbox = Some(sender);
            self.inbox = Some(receiver);
        }
        if let Some(outbox) = &self.outbox {
            let _ = outbox.send(outgoing);
        }
    }

    fn take_inbox(&mut self) -> mpsc::UnboundedReceiver<Outgoing> {
        if self.inbox.is_none() {
            let (sender, receiver) = mpsc::unbounded_channel();
            self.outbox = Some(sender);
            self.inbox = Some(receiver);
        }
        self.inbox.take().expect("just set")
    }
}

/// Routes each copy, at its time, to every subscription that wants its type, or to the long-
/// poll queue when there is none. Runs while the simulator serves.
pub(crate) async fn run_dispatcher(sim: Simulator) {
    shared::tls::init();
    let client = reqwest::Client::new();
    let mut inbox = sim.lock().delivery.take_inbox();
    while let Some(outgoing) = inbox.recv().await {
        let sim = sim.clone();
        let client = client.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(outgoing.not_before.into()).await;
            let targets: Vec<u64> = {
                let mut state = sim.lock();
                if !state.delivery.has_subscriptions() {
                    state.updates.push(outgoing.update);
                    return;
                }
                let update_type = outgoing.update["update_type"].as_str().unwrap_or_default();
                state
                    .delivery
                    .subscriptions
                    .iter()
                    .filter(|s| {
                        s.view
                            .update_types
                            .as_ref()
                            .is_none_or(|types| types.iter().any(|t| t == update_type))
                    })
                    .map(|s| s.id)
                    .collect()
            };
            for id in targets {
                tokio::spawn(deliver(
                    sim.clone(),
                    client.clone(),
                    id,
                    clone_of(&outgoing),
                ));
            }
        });
    }
}

fn clone_of(outgoing: &Outgoing) -> Outgoing {
    Outgoing {
        seq: outgoing.seq,
        update: outgoing.update.clone(),
        happened: outgoing.happened,
        not_before: outgoing.not_before,
        duplicate: outgoing.duplicate,
    }
}

/// Delivers one copy to one subscription on MAX's schedule, until a 200, the give-up, or the
/// subscription is gone.
async fn deliver(sim: Simulator, client: reqwest::Client, id: u64, outgoing: Outgoing) {
    let mut retry = 0u32;
    loop {
        wait_for_a_slot(&sim).await;
        let (url, secret, config) = {
            let state = sim.lock();
            let Some(subscribed) = state.delivery.subscriptions.iter().find(|s| s.id == id) else {
                return;
            };
            (
                subscribed.view.url.clone(),
                subscribed.secret.clone(),
                state.config.clone(),
            )
        };
        let mut request = client.post(&url).json(&outgoing.update);
        if let Some(secret) = &secret {
            request = request.header("X-Max-Bot-Api-Secret", secret);
        }
        let at_ms = now_ms();
        let answer =
            tokio::time::timeout(config.scaled(config.webhook_timeout_secs), request.send()).await;
        let (status, outcome) = match answer {
            Ok(Ok(response)) if response.status() == StatusCode::OK => (Some(200), "ok"),
            Ok(Ok(response)) => (Some(response.status().as_u16()), "status"),
            Ok(Err(_)) => (None, "error"),
            Err(_) => (None, "timeout"),
        };
        let delivered = outcome == "ok";
        {
            let mut state = sim.lock();
            state.delivery.log.attempts.push(DeliveryAttempt {
                seq: outgoing.seq,
                url: url.clone(),
                retry,
                duplicate: outgoing.duplicate,
                at_ms,
                status,
                outcome: outcome.to_owned(),
            });
            let Some(subscribed) = state.delivery.subscriptions.iter_mut().find(|s| s.id == id)
            else {
                return;
            };
            if delivered {
                subscribed.failing_since = None;
                return;
            }
            if subscribed.failing_since.is_none() {
                let since = Instant::now();
                subscribed.failing_since = Some(since);
                tokio::spawn(unsubscribe_if_still_failing(
                    sim.clone(),
                    id,
                    since,
                    config.scaled(config.webhook_give_up_secs),
                ));
            }
        }
        retry += 1;
        let wait = config.scaled(
            config.webhook_retry_first_secs * config.webhook_retry_factor.powi(retry as i32 - 1),
        );
        let give_up_at = outgoing.happened + config.scaled(config.webhook_give_up_secs);
        if retry > config.webhook_max_retries || Instant::now() + wait > give_up_at {
            sim.lock().delivery.log.given_up.push((outgoing.seq, url));
            return;
        }
        tokio::time::sleep(wait).await;
    }
}

/// MAX removes a subscription that has answered nothing but failures for 8 hours.
async fn unsubscribe_if_still_failing(sim: Simulator, id: u64, since: Instant, after: Duration) {
    tokio::time::sleep_until((since + after).into()).await;
    let mut state = sim.lock();
    let delivery = &mut state.delivery;
    if let Some(place) = delivery
        .subscriptions
        .iter()
        .position(|s| s.id == id && s.failing_since == Some(since))
    {
        let removed = delivery.subscriptions.remove(place);
        tracing::info!(url = %removed.view.url, "maxsim: webhook failed too long, unsubscribed");
        delivery.log.unsubscribed.push(removed.view.url);
    }
}

/// Waits until a POST may start under `webhook_max_per_sec`.
async fn wait_for_a_slot(sim: &Simulator) {
    loop {
        let wait = {
            let mut state = sim.lock();
            let cap = state.config.webhook_max_per_sec;
            let window = &mut state.delivery.window;
            if admit_into(window, cap) {
                return;
            }
            window
                .front()
                .map(|first| Duration::from_secs(1).saturating_sub(first.elapsed()))
                .unwrap_or_default()
        };
        tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
    }
}

impl Simulator {
    /// The subscriptions now, every delivery attempt, what was given up.
    pub fn deliveries(&self) -> DeliveryLog {
        let state = self.lock();
        let mut log = state.delivery.log.clone();
        log.subscriptions = state
            .delivery
            .subscriptions
            .iter()
            .map(|s| s.view.clone())
            .collect();
        log
    }

    /// The subscriptions `GET /subscriptions` lists.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        self.deliveries().subscriptions
    }
}

pub(crate) async fn get_deliveries(State(sim): State<Simulator>) -> Json<DeliveryLog> {
    Json(sim.deliveries())
}

#[derive(Deserialize)]
pub(crate) struct SubscribeBody {
    url: Option<String>,
    update_types: Option<Vec<String>>,
    secret: Option<String>,
}

/// MAX's secret rule: `^[a-zA-Z0-9_-]{5,256}$`.
pub(crate) fn valid_secret(secret: &str) -> bool {
    (5..=256).contains(&secret.len())
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `https://` with no port but 443, or (the simulator's deviation) `http://` to a loopback host.
fn valid_url(url: &str, allow_http_loopback: bool) -> Result<(), &'static str> {
    let (https, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err("url must start with https://");
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    if host.is_empty() {
        return Err("url has no host");
    }
    if https {
        return match port {
            None | Some("443") => Ok(()),
            Some(_) => Err("only port 443 is allowed"),
        };
    }
    let loopback = host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback());
    if allow_http_loopback && loopback {
        Ok(())
    } else {
        Err("url must start with https://")
    }
}

pub(crate) async fn post_subscriptions(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let mut state = sim.lock();
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let bad = |message: &str| error(StatusCode::BAD_REQUEST, "proto.payload", message);
    let Ok(body) = serde_json::from_slice::<SubscribeBody>(&body) else {
        return bad("the body must be a subscription");
    };
    let Some(url) = body.url else {
        return bad("url is required");
    };
    if let Err(message) = valid_url(&url, state.config.allow_http_loopback_webhooks) {
        return bad(message);
    }
    if body.secret.as_deref().is_some_and(|s| !valid_secret(s)) {
        return bad("secret must match ^[a-zA-Z0-9_-]{5,256}$");
    }
    let delivery = &mut state.delivery;
    delivery.subscriptions.retain(|s| s.view.url != url);
    delivery.next_id += 1;
    delivery.subscriptions.push(Subscribed {
        id: delivery.next_id,
        view: Subscription {
            url,
            time: now_ms(),
            update_types: body.update_types,
        },
        secret: body.secret,
        failing_since: None,
    });
    Json(json!({"success": true})).into_response()
}

pub(crate) async fn get_subscriptions(
    State(sim): State<Simulator>,
    headers: HeaderMap,
) -> Response {
    {
        let mut state = sim.lock();
        if let Some(refused) = state.refuse(&headers) {
            return refused;
        }
    }
    Json(json!({"subscriptions": sim.subscriptions()})).into_response()
}

#[derive(Deserialize)]
pub(crate) struct UnsubscribeQuery {
    url: Option<String>,
}

pub(crate) async fn delete_subscriptions(
    State(sim): State<Simulator>,
    headers: HeaderMap,
    Query(query): Query<UnsubscribeQuery>,
) -> Response {
    let mut state = sim.lock();
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let Some(url) = query.url else {
        return error(StatusCode::BAD_REQUEST, "proto.payload", "url is required");
    };
    let before = state.delivery.subscriptions.len();
    state.delivery.subscriptions.retain(|s| s.view.url != url);
    if state.delivery.subscriptions.len() < before {
        Json(json!({"success": true})).into_response()
    } else {
        Json(json!({"success": false, "message": "no subscription with this url"})).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_follow_max_pattern() {
        assert!(valid_secret("abc_DEF-123"));
        assert!(valid_secret(&"a".repeat(256)));
        assert!(!valid_secret("abcd"), "4 characters");
        assert!(!valid_secret(&"a".repeat(257)));
        assert!(!valid_secret("with space"));
        assert!(!valid_secret("dot.ted"));
    }

    #[test]
    fn urls_are_https_on_443_or_loopback_http_when_allowed() {
        assert!(valid_url("https://example.org/max/updates", false).is_ok());
        assert!(valid_url("https://example.org:443/x", false).is_ok());
        assert!(valid_url("https://example.org:8443/x", false).is_err());
        assert!(valid_url("http://example.org/x", true).is_err());
        assert!(valid_url("http://127.0.0.1:9092/max/updates", true).is_ok());
        assert!(valid_url("http://localhost:9092/max/updates", true).is_ok());
        assert!(valid_url("http://[::1]:9092/x", true).is_ok());
        assert!(valid_url("http://127.0.0.1:9092/max/updates", false).is_err());
        assert!(valid_url("ftp://127.0.0.1/", true).is_err());
    }
}
