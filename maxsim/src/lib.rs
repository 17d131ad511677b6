//! A MAX Bot API simulator that follows the facts of SPEC §4 and §10 and `MAX_EVENTS.md`.
//!
//! - `GET /chats/{chatId}` (`chats`): the raw token in `Authorization`, JSON errors
//!   `{"code", "message"}`, 429 past a rate limit (at most `rate_limit` accepted requests in any
//!   sliding one-second window), and injectable latency, 5xx errors, hangs, answers that are not
//!   a chat (an HTML proxy page, a chat without its count) and count drift.
//! - A *population* makes the chats look like a deployment's: a share gone for good (each answers
//!   404, 403 or a non-active status, always the same way), a share the bot is not in yet (403
//!   until the bot joins, at a configured moment or through `POST /_sim/join/{chat_id}`), and a
//!   share where the bot is an administrator (`admin_permille`). All are off by default.
//! - Membership (`members`): `GET /chats/{chatId}/members/me`, changes of concrete users that
//!   move `participants_count`, the bot joining and leaving, titles.
//! - Events (`events`): every change emits MAX's Update where MAX would send one; they reach
//!   the bot by webhook (`delivery`: `/subscriptions`, POSTs with the secret, MAX's retries and
//!   give-up) or by long polling (`updates`: `GET /updates` with the marker), never both.
//!
//! Control endpoints under `/_sim/` let tests change behaviour and read what happened. Every
//! duration of MAX's event delivery is divided by `time_scale`, so hours pass in seconds.

mod chats;
mod delivery;
mod events;
mod members;
mod updates;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use chats::{GoneAnswer, Presence};
pub use delivery::{DeliveryAttempt, DeliveryLog, Subscription};
pub use events::SimEvent;
pub use members::{AdminRights, MemberChange};

/// How the simulator behaves. Every field can be changed at run time with `POST /_sim/config`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// The bot token that `Authorization` must carry, raw (no `Bearer`).
    pub token: String,
    /// Accepted requests allowed in any sliding one-second window; 0 means no limit.
    pub rate_limit: u32,
    /// Added to every answer.
    pub latency_ms: u64,
    /// Uniform jitter added on top of `latency_ms`.
    pub latency_jitter_ms: u64,
    /// Share of requests answered 500/503.
    pub error_rate: f64,
    /// Share of requests that hang for `hang_ms` before answering (a client sees a timeout).
    pub timeout_rate: f64,
    pub hang_ms: u64,
    /// Per mille of chats gone for good. Each answers, chosen by its id, one of: 404
    /// `not.found`, 403 `chat.denied`, or 200 with `status` `removed` or `left`.
    pub removed_permille: u32,
    /// Per mille of chats the bot is not in yet: 403 `chat.denied` until they join. Drawn from
    /// the other end of the same hash as `removed_permille`, so the two shares never overlap
    /// while their sum is at most 1000.
    pub not_joined_permille: u32,
    /// Seconds after the simulator started at which the chats of `not_joined_permille` join;
    /// `None`: only `POST /_sim/join/{chat_id}` lets them in.
    pub join_after_secs: Option<u64>,
    /// Spreads those joins over this many seconds after `join_after_secs`, chosen by chat id.
    pub join_spread_secs: u64,
    /// Share of requests answered 200 with an HTML page (a captive portal or a proxy's page).
    pub not_a_chat_rate: f64,
    /// Share of requests answered 200 with a chat that has no `participants_count`.
    pub no_count_rate: f64,
    /// Every this many seconds each chat's count moves by up to ±10; 0 keeps counts still. In a
    /// chat whose events reach the bot, each move is made of membership changes with events.
    pub churn_period_secs: u64,
    /// When false every request is answered 401, as for a revoked token.
    pub token_valid: bool,
    /// Answer an invalid token as 403 `verify.token` (seen in the docs) instead of 401.
    pub invalid_token_as_403: bool,

    /// Per mille of chats where the bot is an administrator (with `read_all_messages`), chosen
    /// by a hash of the chat id of its own; `POST /_sim/admin/{chat_id}` overrides one chat.
    pub admin_permille: u32,
    /// The bot's own user id (`/members/me`).
    pub bot_user_id: i64,
    /// Simulated seconds per real second for every duration of event delivery: webhook
    /// timeout, retries, give-up, reordering delays, the long-poll retention, background
    /// membership changes. 3600 runs an hour of MAX in a second.
    pub time_scale: f64,
    /// Background membership changes per simulated second, over all the chats the simulator
    /// knows where the bot is (half joins, half leaves); 0: none.
    pub member_changes_per_sec: f64,
    /// A webhook answer slower than this (simulated seconds) is a failed delivery.
    pub webhook_timeout_secs: f64,
    /// The first retry of a failed delivery comes this long (simulated seconds) after it ...
    pub webhook_retry_first_secs: f64,
    /// ... and each next one this many times later than the previous.
    pub webhook_retry_factor: f64,
    /// At most this many retries of one event.
    pub webhook_max_retries: u32,
    /// An event is given up this long (simulated seconds) after it happened, and a
    /// subscription that failed for this long is removed.
    pub webhook_give_up_secs: f64,
    /// Webhook POSTs started in any real second, over all subscriptions; 0: no cap.
    pub webhook_max_per_sec: u32,
    /// Share of events delivered twice (webhook and long poll alike).
    pub duplicate_rate: f64,
    /// Share of events held back by a random delay of up to `reorder_max_secs` (simulated).
    pub reorder_rate: f64,
    pub reorder_max_secs: f64,
    /// `GET /updates` requests accepted in any sliding one-second window; 0: no limit.
    pub updates_rate_limit: u32,
    /// Long-poll updates older than this (simulated seconds) are dropped.
    pub updates_retention_secs: f64,
    /// Accept `http://` webhook URLs on a loopback host (MAX wants `https://`; tests have no
    /// TLS).
    pub allow_http_loopback_webhooks: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            token: "sim-token".to_owned(),
            rate_limit: 30,
            latency_ms: 0,
            latency_jitter_ms: 0,
            error_rate: 0.0,
            timeout_rate: 0.0,
            hang_ms: 60_000,
            removed_permille: 0,
            not_joined_permille: 0,
            join_after_secs: None,
            join_spread_secs: 0,
            not_a_chat_rate: 0.0,
            no_count_rate: 0.0,
            churn_period_secs: 0,
            token_valid: true,
            invalid_token_as_403: false,
            admin_permille: 0,
            bot_user_id: 229_229_229,
            time_scale: 1.0,
            member_changes_per_sec: 0.0,
            webhook_timeout_secs: 30.0,
            webhook_retry_first_secs: 60.0,
            webhook_retry_factor: 2.5,
            webhook_max_retries: 10,
            webhook_give_up_secs: 8.0 * 3600.0,
            webhook_max_per_sec: 100,
            duplicate_rate: 0.0,
            reorder_rate: 0.0,
            reorder_max_secs: 60.0,
            updates_rate_limit: 2,
            updates_retention_secs: 24.0 * 3600.0,
            allow_http_loopback_webhooks: true,
        }
    }
}

impl SimConfig {
    /// Simulated seconds per real second; a `time_scale` that is not positive counts as 1.
    pub fn scale(&self) -> f64 {
        if self.time_scale > 0.0 {
            self.time_scale
        } else {
            1.0
        }
    }

    /// The real duration of `secs` simulated seconds.
    pub fn scaled(&self, secs: f64) -> Duration {
        Duration::try_from_secs_f64((secs / self.scale()).max(0.0)).unwrap_or(Duration::MAX)
    }
}

/// A per-chat answer that overrides the generated one.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ChatOverride {
    pub participants_count: Option<i32>,
    /// active, removed, left or closed
    pub status: Option<String>,
    /// Answer with this HTTP status and an error body instead of the chat.
    pub http_status: Option<u16>,
}

/// What the simulator saw.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    pub requests: u64,
    pub ok: u64,
    pub rate_limited: u64,
    pub unauthorized: u64,
    pub errors: u64,
    pub not_found: u64,
    /// Chats answered 403 `chat.denied` (gone for good, or not joined yet).
    pub denied: u64,
    /// Answers that were not a chat: an HTML page, or a chat without its count.
    pub not_a_chat: u64,
    /// Accepted requests per chat id.
    pub calls_per_chat: HashMap<i64, u64>,
    /// The most accepted requests seen in any one-second window.
    pub max_in_window: usize,
    /// `GET /updates` requests admitted (past the token, the subscription and the rate limit).
    pub updates_polls: u64,
    /// The most `GET /updates` requests in flight at once: above 1, two pollers overlapped.
    pub updates_max_in_flight: usize,
}

pub(crate) struct State_ {
    pub(crate) config: SimConfig,
    pub(crate) overrides: HashMap<i64, ChatOverride>,
    pub(crate) membership: HashMap<i64, chats::Membership>,
    pub(crate) started: Instant,
    pub(crate) window: VecDeque<Instant>,
    pub(crate) stats: Stats,
    pub(crate) members: members::Members,
    pub(crate) events: events::EventLog,
    pub(crate) updates: updates::UpdateQueue,
    pub(crate) delivery: delivery::Delivery,
}

/// A simulator instance; clone it to share.
#[derive(Clone)]
pub struct Simulator {
    state: Arc<Mutex<State_>>,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        Self {
            state: Arc::new(Mutex::new(State_ {
                config,
                overrides: HashMap::new(),
                membership: HashMap::new(),
                started: Instant::now(),
                window: VecDeque::new(),
                stats: Stats::default(),
                members: members::Members::default(),
                events: events::EventLog::default(),
                updates: updates::UpdateQueue::default(),
                delivery: delivery::Delivery::default(),
            })),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn config(&self) -> SimConfig {
        self.lock().config.clone()
    }

    pub fn set_config(&self, config: SimConfig) {
        self.lock().config = config;
    }

    /// Changes the configuration in place.
    pub fn update(&self, change: impl FnOnce(&mut SimConfig)) {
        change(&mut self.lock().config);
    }

    pub fn override_chat(&self, chat_id: i64, answer: ChatOverride) {
        self.lock().overrides.insert(chat_id, answer);
    }

    pub fn reset_stats(&self) {
        let mut state = self.lock();
        state.stats = Stats::default();
        state.window.clear();
    }

    /// The HTTP routes: the MAX API and the `/_sim/` controls.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/chats/{chat_id}", get(chats::get_chat))
            .route("/chats/{chat_id}/members/me", get(members::get_members_me))
            .route("/updates", get(updates::get_updates))
            .route(
                "/subscriptions",
                get(delivery::get_subscriptions)
                    .post(delivery::post_subscriptions)
                    .delete(delivery::delete_subscriptions),
            )
            .route("/_sim/stats", get(get_stats))
            .route("/_sim/config", post(post_config).get(get_config))
            .route("/_sim/reset", post(post_reset))
            .route("/_sim/chats", post(members::post_known_chats))
            .route("/_sim/chats/{chat_id}", put(chats::put_chat))
            .route("/_sim/join/{chat_id}", post(chats::post_join))
            .route("/_sim/leave/{chat_id}", post(members::post_leave))
            .route("/_sim/not-joined/{chat_id}", post(chats::post_not_joined))
            .route(
                "/_sim/admin/{chat_id}",
                post(members::post_admin).get(members::get_admin),
            )
            .route("/_sim/members/{chat_id}", post(members::post_member_change))
            .route("/_sim/title/{chat_id}", post(members::post_title))
            .route("/_sim/count/{chat_id}", get(members::get_count))
            .route("/_sim/events", get(events::get_events))
            .route("/_sim/deliveries", get(delivery::get_deliveries))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, with the background membership changes
    /// and joins (`members::run_background`) and the event dispatcher running beside: events
    /// held back or bound for a webhook move only while the simulator serves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let background = tokio::spawn(members::run_background(self.clone()));
        let dispatcher = tokio::spawn(delivery::run_dispatcher(self.clone()));
        let served = axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await;
        background.abort();
        dispatcher.abort();
        served
    }

    /// Starts serving on a free loopback port in the background; for tests.
    pub async fn spawn(config: SimConfig) -> (Self, SocketAddr) {
        let simulator = Self::new(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("loopback bind");
        let address = listener.local_addr().expect("bound address");
        tokio::spawn(simulator.clone().serve(listener, std::future::pending()));
        (simulator, address)
    }
}

pub(crate) fn hash_of(values: &[i64]) -> u64 {
    let mut hasher = DefaultHasher::new();
    values.hash(&mut hasher);
    hasher.finish()
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

impl State_ {
    /// The answer to a request whose token is not the bot's, counted; `None` when it is.
    pub(crate) fn refuse_token(&mut self, headers: &HeaderMap) -> Option<Response> {
        let token = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        if token == self.config.token && self.config.token_valid {
            return None;
        }
        self.stats.unauthorized += 1;
        let status = if self.config.invalid_token_as_403 {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::UNAUTHORIZED
        };
        Some(error(status, "verify.token", "Invalid access_token"))
    }

    /// Counts a request of the bot API and answers it when MAX would refuse it before
    /// looking at it: a token that is not the bot's, or the token's rate spent; `None` when
    /// it may go on.
    pub(crate) fn refuse(&mut self, headers: &HeaderMap) -> Option<Response> {
        self.stats.requests += 1;
        if let Some(refused) = self.refuse_token(headers) {
            return Some(refused);
        }
        let limit = self.config.rate_limit;
        if !self.admit(limit) {
            self.stats.rate_limited += 1;
            return Some(too_many_requests());
        }
        None
    }

    /// Admits a request into the sliding one-second window unless `rate_limit` (0: none)
    /// requests are in it already.
    pub(crate) fn admit(&mut self, rate_limit: u32) -> bool {
        let admitted = admit_into(&mut self.window, rate_limit);
        self.stats.max_in_window = self.stats.max_in_window.max(self.window.len());
        admitted
    }
}

/// A sliding one-second window of admitted instants: admits one more unless `limit` (0: none)
/// are in it already.
pub(crate) fn admit_into(window: &mut VecDeque<Instant>, limit: u32) -> bool {
    let now = Instant::now();
    while window
        .front()
        .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
    {
        window.pop_front();
    }
    if limit > 0 && window.len() >= limit as usize {
        return false;
    }
    window.push_back(now);
    true
}

pub(crate) fn too_many_requests() -> Response {
    error(
        StatusCode::TOO_MANY_REQUESTS,
        "too.many.requests",
        "the number of requests is exceeded",
    )
}

async fn get_stats(axum::extract::State(sim): axum::extract::State<Simulator>) -> Json<Stats> {
    Json(sim.stats())
}

async fn get_config(axum::extract::State(sim): axum::extract::State<Simulator>) -> Json<SimConfig> {
    Json(sim.config())
}

async fn post_config(
    axum::extract::State(sim): axum::extract::State<Simulator>,
    Json(patch): Json<serde_json::Value>,
) -> Response {
    let mut current = serde_json::to_value(sim.config()).expect("config serializes");
    if let (Some(target), Some(changes)) = (current.as_object_mut(), patch.as_object()) {
        for (key, value) in changes {
            target.insert(key.clone(), value.clone());
        }
    }
    match serde_json::from_value::<SimConfig>(current) {
        Ok(config) => {
            sim.set_config(config.clone());
            Json(config).into_response()
        }
        Err(e) => error(StatusCode::BAD_REQUEST, "sim.config", &e.to_string()),
    }
}

async fn post_reset(axum::extract::State(sim): axum::extract::State<Simulator>) -> StatusCode {
    sim.reset_stats();
    StatusCode::NO_CONTENT
}
