//! A MAX Bot API simulator that follows the facts of SPEC §4: `GET /chats/{chatId}` with the raw
//! token in `Authorization`, JSON errors `{"code", "message"}`, 429 past a rate limit (at most
//! `rate_limit` accepted requests in any sliding one-second window), and injectable latency,
//! 5xx errors, hangs, removed chats and membership churn.
//!
//! Control endpoints under `/_sim/` let tests change behaviour and read what was called.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

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
    /// Per mille of chat ids that the bot was removed from (answered as removed, 403 or 404).
    pub removed_permille: u32,
    /// Every this many seconds each chat's count moves by up to ±10; 0 keeps counts still.
    pub churn_period_secs: u64,
    /// When false every request is answered 401, as for a revoked token.
    pub token_valid: bool,
    /// Answer an invalid token as 403 `verify.token` (seen in the docs) instead of 401.
    pub invalid_token_as_403: bool,
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
            churn_period_secs: 0,
            token_valid: true,
            invalid_token_as_403: false,
        }
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
    /// Accepted requests per chat id.
    pub calls_per_chat: HashMap<i64, u64>,
    /// The most accepted requests seen in any one-second window.
    pub max_in_window: usize,
}

struct State_ {
    config: SimConfig,
    overrides: HashMap<i64, ChatOverride>,
    window: VecDeque<Instant>,
    stats: Stats,
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
                window: VecDeque::new(),
                stats: Stats::default(),
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
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

    /// The count the simulator currently reports for a chat.
    pub fn count_of(&self, chat_id: i64) -> i32 {
        let state = self.lock();
        if let Some(count) = state
            .overrides
            .get(&chat_id)
            .and_then(|o| o.participants_count)
        {
            return count;
        }
        generated_count(chat_id, state.config.churn_period_secs)
    }

    /// The HTTP routes: the MAX API and the `/_sim/` controls.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/chats/{chat_id}", get(get_chat))
            .route("/_sim/stats", get(get_stats))
            .route("/_sim/config", post(post_config).get(get_config))
            .route("/_sim/reset", post(post_reset))
            .route("/_sim/chats/{chat_id}", put(put_chat))
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` resolves.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(listener, self.router())
            .with_graceful_shutdown(shutdown)
            .await
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

fn hash_of(values: &[i64]) -> u64 {
    let mut hasher = DefaultHasher::new();
    values.hash(&mut hasher);
    hasher.finish()
}

fn generated_count(chat_id: i64, churn_period_secs: u64) -> i32 {
    let base = 2 + (hash_of(&[chat_id]) % 500) as i32;
    if churn_period_secs == 0 {
        return base;
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let epoch = (now / churn_period_secs) as i64;
    let delta = (hash_of(&[chat_id, epoch]) % 21) as i32 - 10;
    (base + delta).max(1)
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

enum Verdict {
    Answer(Response),
    Chat { count: i32, status: String },
}

async fn get_chat(
    State(sim): State<Simulator>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (delay, verdict) = {
        let mut state = sim.lock();
        state.stats.requests += 1;
        let config = state.config.clone();
        let mut rng = rand::thread_rng();
        let jitter = if config.latency_jitter_ms > 0 {
            rng.gen_range(0..=config.latency_jitter_ms)
        } else {
            0
        };
        let mut delay = Duration::from_millis(config.latency_ms + jitter);
        let token = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let verdict = if token != config.token || !config.token_valid {
            state.stats.unauthorized += 1;
            Verdict::Answer(if config.invalid_token_as_403 {
                error(
                    StatusCode::FORBIDDEN,
                    "verify.token",
                    "Invalid access_token",
                )
            } else {
                error(
                    StatusCode::UNAUTHORIZED,
                    "verify.token",
                    "Invalid access_token",
                )
            })
        } else {
            let now = Instant::now();
            while state
                .window
                .front()
                .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
            {
                state.window.pop_front();
            }
            if config.rate_limit > 0 && state.window.len() >= config.rate_limit as usize {
                state.stats.rate_limited += 1;
                Verdict::Answer(error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too.many.requests",
                    "the number of requests is exceeded",
                ))
            } else {
                state.window.push_back(now);
                state.stats.max_in_window = state.stats.max_in_window.max(state.window.len());
                match chat_id.parse::<i64>() {
                    Err(_) => Verdict::Answer(error(
                        StatusCode::BAD_REQUEST,
                        "proto.payload",
                        "chatId must be an integer",
                    )),
                    Ok(id) => {
                        *state.stats.calls_per_chat.entry(id).or_default() += 1;
                        let roll: f64 = rng.gen();
                        if roll < config.timeout_rate {
                            delay += Duration::from_millis(config.hang_ms);
                            Verdict::Answer(error(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "internal.error",
                                "hung",
                            ))
                        } else if roll < config.timeout_rate + config.error_rate {
                            state.stats.errors += 1;
                            let status = if rng.gen_bool(0.5) {
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::SERVICE_UNAVAILABLE
                            };
                            Verdict::Answer(error(status, "internal.error", "Internal error"))
                        } else {
                            let chosen = state.overrides.get(&id).cloned().unwrap_or_default();
                            let removed =
                                (hash_of(&[id, 7]) % 1000) < u64::from(config.removed_permille);
                            let removed_kind = hash_of(&[id, 11]) % 3;
                            match (chosen.http_status, removed, removed_kind) {
                                (Some(code), _, _) => {
                                    let status = StatusCode::from_u16(code)
                                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                                    if status == StatusCode::NOT_FOUND {
                                        state.stats.not_found += 1;
                                    }
                                    Verdict::Answer(error(status, "chat.denied", "overridden"))
                                }
                                (None, true, 0) => {
                                    state.stats.not_found += 1;
                                    Verdict::Answer(error(
                                        StatusCode::NOT_FOUND,
                                        "chat.not.found",
                                        "Chat not found",
                                    ))
                                }
                                (None, true, 1) => Verdict::Answer(error(
                                    StatusCode::FORBIDDEN,
                                    "chat.denied",
                                    "bot is not a member of the chat",
                                )),
                                (None, true, _) => Verdict::Chat {
                                    count: generated_count(id, config.churn_period_secs),
                                    status: "removed".to_owned(),
                                },
                                (None, false, _) => Verdict::Chat {
                                    count: chosen.participants_count.unwrap_or_else(|| {
                                        generated_count(id, config.churn_period_secs)
                                    }),
                                    status: chosen.status.unwrap_or_else(|| "active".to_owned()),
                                },
                            }
                        }
                    }
                }
            }
        };
        if let Verdict::Chat { .. } = verdict {
            state.stats.ok += 1;
        }
        (delay, verdict)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match verdict {
        Verdict::Answer(response) => response,
        Verdict::Chat { count, status } => {
            let id: i64 = chat_id.parse().unwrap_or_default();
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            Json(json!({
                "chat_id": id,
                "type": "chat",
                "status": status,
                "title": format!("chat {id}"),
                "icon": null,
                "last_event_time": now_ms,
                "participants_count": count,
                "is_public": false,
                "description": null,
                "owner_id": 123123123,
                "link": format!("https://max.ru/join/{id}"),
                "messages_count": 7,
                "participants": null,
                "a_field_from_the_future": {"ignored": true}
            }))
            .into_response()
        }
    }
}

async fn get_stats(State(sim): State<Simulator>) -> Json<Stats> {
    Json(sim.stats())
}

async fn get_config(State(sim): State<Simulator>) -> Json<SimConfig> {
    Json(sim.config())
}

async fn post_config(
    State(sim): State<Simulator>,
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

async fn post_reset(State(sim): State<Simulator>) -> StatusCode {
    sim.reset_stats();
    StatusCode::NO_CONTENT
}

async fn put_chat(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Json(answer): Json<ChatOverride>,
) -> StatusCode {
    sim.override_chat(chat_id, answer);
    StatusCode::NO_CONTENT
}
