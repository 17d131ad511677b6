//! A MAX Bot API simulator that follows the facts of SPEC §4: `GET /chats/{chatId}` with the raw
//! token in `Authorization`, JSON errors `{"code", "message"}`, 429 past a rate limit (at most
//! `rate_limit` accepted requests in any sliding one-second window), and injectable latency,
//! 5xx errors, hangs, answers that are not a chat (an HTML proxy page, a chat without its
//! count) and membership churn.
//!
//! A *population* makes the chats look like a deployment's: a share gone for good (each answers
//! 404, 403 or a non-active status, always the same way), and a share the bot is not in yet
//! (403 until the bot joins, at a configured moment or through `POST /_sim/join/{chat_id}`).
//! Both are off by default.
//!
//! Control endpoints under `/_sim/` let tests change behaviour and read what was called.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
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
            not_joined_permille: 0,
            join_after_secs: None,
            join_spread_secs: 0,
            not_a_chat_rate: 0.0,
            no_count_rate: 0.0,
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
    /// Chats answered 403 `chat.denied` (gone for good, or not joined yet).
    pub denied: u64,
    /// Answers that were not a chat: an HTML page, or a chat without its count.
    pub not_a_chat: u64,
    /// Accepted requests per chat id.
    pub calls_per_chat: HashMap<i64, u64>,
    /// The most accepted requests seen in any one-second window.
    pub max_in_window: usize,
}

/// How MAX sees the bot's place in one chat, before any injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// The bot is in the chat: status `active` and a count.
    Active,
    /// Gone for good (`removed_permille`), answering this way every time.
    Gone(GoneAnswer),
    /// The bot is not in the chat yet: 403 `chat.denied` until it joins.
    NotJoined,
}

/// What a chat gone for good answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GoneAnswer {
    /// 404 `not.found`
    NotFound,
    /// 403 `chat.denied`
    Denied,
    /// 200 with `status: removed`
    Removed,
    /// 200 with `status: left`
    Left,
}

/// A membership set for one chat through `join` or `not_joined`, over the population's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Membership {
    Joined,
    /// Joins at this time since the simulator started, or only when told.
    NotJoined {
        joins_at: Option<Duration>,
    },
}

struct State_ {
    config: SimConfig,
    overrides: HashMap<i64, ChatOverride>,
    membership: HashMap<i64, Membership>,
    started: Instant,
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
                membership: HashMap::new(),
                started: Instant::now(),
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

    /// The bot joins the chat now (it answers as active from now on, unless gone for good).
    pub fn join(&self, chat_id: i64) {
        self.lock().membership.insert(chat_id, Membership::Joined);
    }

    /// The bot is not in the chat yet: it answers 403 `chat.denied` until `join`, or until
    /// `joins_in` has passed.
    pub fn not_joined(&self, chat_id: i64, joins_in: Option<Duration>) {
        let mut state = self.lock();
        let joins_at = joins_in.map(|wait| state.started.elapsed() + wait);
        state
            .membership
            .insert(chat_id, Membership::NotJoined { joins_at });
    }

    /// How the chat would answer now, faults aside.
    pub fn presence_of(&self, chat_id: i64) -> Presence {
        let state = self.lock();
        presence(
            &state.config,
            chat_id,
            state.membership.get(&chat_id).copied(),
            state.started.elapsed(),
        )
    }

    /// Whether the chat would now answer with status `active` and a count, faults aside.
    pub fn is_active(&self, chat_id: i64) -> bool {
        let chosen = self.lock().overrides.get(&chat_id).cloned();
        let overridden_away = chosen.is_some_and(|o| {
            o.http_status.is_some() || o.status.is_some_and(|status| status != "active")
        });
        !overridden_away && self.presence_of(chat_id) == Presence::Active
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
            .route("/_sim/join/{chat_id}", post(post_join))
            .route("/_sim/not-joined/{chat_id}", post(post_not_joined))
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

/// Where a chat stands in the population: gone for good, not joined yet, or active. An
/// explicit membership (`join`, `not_joined`) wins over the population's, a gone chat over both.
fn presence(
    config: &SimConfig,
    chat_id: i64,
    membership: Option<Membership>,
    since_start: Duration,
) -> Presence {
    let draw = hash_of(&[chat_id, 7]) % 1000;
    if draw < u64::from(config.removed_permille) {
        return Presence::Gone(match hash_of(&[chat_id, 11]) % 4 {
            0 => GoneAnswer::NotFound,
            1 => GoneAnswer::Denied,
            2 => GoneAnswer::Removed,
            _ => GoneAnswer::Left,
        });
    }
    let joins_at = match membership {
        Some(Membership::Joined) => return Presence::Active,
        Some(Membership::NotJoined { joins_at }) => joins_at,
        None if draw >= 1000 - u64::from(config.not_joined_permille.min(1000)) => {
            config.join_after_secs.map(|after| {
                let spread_ms = config.join_spread_secs * 1000;
                let offset = if spread_ms > 0 {
                    hash_of(&[chat_id, 17]) % spread_ms
                } else {
                    0
                };
                Duration::from_secs(after) + Duration::from_millis(offset)
            })
        }
        None => return Presence::Active,
    };
    match joins_at {
        Some(at) if since_start >= at => Presence::Active,
        _ => Presence::NotJoined,
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

/// What a captive portal or a misconfigured proxy answers in MAX's place.
const NOT_A_CHAT_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Wi-Fi login</title></head>\
<body><h1>Please sign in to the network</h1><form action=\"/login\"><input name=\"code\"></form>\
</body></html>\n";

enum Verdict {
    Answer(Response),
    /// A chat; without a count when `count` is `None`.
    Chat {
        count: Option<i32>,
        status: String,
    },
    /// 200 with an HTML page.
    NotAChat,
}

async fn get_chat(
    State(sim): State<Simulator>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    let (delay, verdict) = sim.decide(&chat_id, token);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match verdict {
        Verdict::Answer(response) => response,
        Verdict::NotAChat => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
            NOT_A_CHAT_PAGE,
        )
            .into_response(),
        Verdict::Chat { count, status } => Json(chat_body(
            chat_id.parse().unwrap_or_default(),
            count,
            &status,
        ))
        .into_response(),
    }
}

/// MAX's Chat JSON, with fields this service does not read, and one it cannot know yet.
fn chat_body(id: i64, count: Option<i32>, status: &str) -> serde_json::Value {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let mut body = json!({
        "chat_id": id,
        "type": "chat",
        "status": status,
        "title": format!("chat {id}"),
        "icon": null,
        "last_event_time": now_ms,
        "is_public": false,
        "description": null,
        "owner_id": 123123123,
        "link": format!("https://max.ru/join/{id}"),
        "messages_count": 7,
        "participants": null,
        "a_field_from_the_future": {"ignored": true}
    });
    if let (Some(count), Some(fields)) = (count, body.as_object_mut()) {
        fields.insert("participants_count".to_owned(), count.into());
    }
    body
}

impl Simulator {
    /// The answer to one `GET /chats/{chat_id}` and how long to wait before giving it.
    fn decide(&self, chat_id: &str, token: &str) -> (Duration, Verdict) {
        let mut state = self.lock();
        state.stats.requests += 1;
        let config = state.config.clone();
        let mut rng = rand::thread_rng();
        let jitter = if config.latency_jitter_ms > 0 {
            rng.gen_range(0..=config.latency_jitter_ms)
        } else {
            0
        };
        let mut delay = Duration::from_millis(config.latency_ms + jitter);
        let verdict = if token != config.token || !config.token_valid {
            state.stats.unauthorized += 1;
            let status = if config.invalid_token_as_403 {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            };
            Verdict::Answer(error(status, "verify.token", "Invalid access_token"))
        } else if !state.admit(config.rate_limit) {
            state.stats.rate_limited += 1;
            Verdict::Answer(error(
                StatusCode::TOO_MANY_REQUESTS,
                "too.many.requests",
                "the number of requests is exceeded",
            ))
        } else {
            match chat_id.parse::<i64>() {
                Err(_) => Verdict::Answer(error(
                    StatusCode::BAD_REQUEST,
                    "proto.payload",
                    "chatId must be an integer",
                )),
                Ok(id) => {
                    *state.stats.calls_per_chat.entry(id).or_default() += 1;
                    state.answer(id, &config, &mut rng, &mut delay)
                }
            }
        };
        if let Verdict::Chat { count: Some(_), .. } = verdict {
            state.stats.ok += 1;
        }
        (delay, verdict)
    }
}

impl State_ {
    /// Admits a request into the sliding one-second window unless `rate_limit` (0: none)
    /// requests are in it already.
    fn admit(&mut self, rate_limit: u32) -> bool {
        let now = Instant::now();
        while self
            .window
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
        {
            self.window.pop_front();
        }
        if rate_limit > 0 && self.window.len() >= rate_limit as usize {
            return false;
        }
        self.window.push_back(now);
        self.stats.max_in_window = self.stats.max_in_window.max(self.window.len());
        true
    }

    /// An accepted call for chat `id`: an injected fault (the shares are disjoint slices of
    /// one roll), or the chat's own answer.
    fn answer(
        &mut self,
        id: i64,
        config: &SimConfig,
        rng: &mut impl Rng,
        delay: &mut Duration,
    ) -> Verdict {
        let roll: f64 = rng.gen();
        let mut below = config.timeout_rate;
        if roll < below {
            *delay += Duration::from_millis(config.hang_ms);
            return Verdict::Answer(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "internal.error",
                "hung",
            ));
        }
        below += config.error_rate;
        if roll < below {
            self.stats.errors += 1;
            let status = if rng.gen_bool(0.5) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            return Verdict::Answer(error(status, "internal.error", "Internal error"));
        }
        below += config.not_a_chat_rate;
        if roll < below {
            self.stats.not_a_chat += 1;
            return Verdict::NotAChat;
        }
        below += config.no_count_rate;
        if roll < below {
            self.stats.not_a_chat += 1;
            return Verdict::Chat {
                count: None,
                status: "active".to_owned(),
            };
        }
        self.chat_answer(id, config)
    }

    /// The chat's own answer: its override, else its place in the population.
    fn chat_answer(&mut self, id: i64, config: &SimConfig) -> Verdict {
        let chosen = self.overrides.get(&id).cloned().unwrap_or_default();
        if let Some(code) = chosen.http_status {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if status == StatusCode::NOT_FOUND {
                self.stats.not_found += 1;
            } else if status == StatusCode::FORBIDDEN {
                self.stats.denied += 1;
            }
            return Verdict::Answer(error(status, "chat.denied", "overridden"));
        }
        let membership = self.membership.get(&id).copied();
        let generated = || Some(generated_count(id, config.churn_period_secs));
        match presence(config, id, membership, self.started.elapsed()) {
            Presence::Gone(GoneAnswer::NotFound) => {
                self.stats.not_found += 1;
                Verdict::Answer(error(StatusCode::NOT_FOUND, "not.found", "Chat not found"))
            }
            Presence::Gone(GoneAnswer::Denied) | Presence::NotJoined => {
                self.stats.denied += 1;
                Verdict::Answer(error(
                    StatusCode::FORBIDDEN,
                    "chat.denied",
                    "bot is not a member of the chat",
                ))
            }
            Presence::Gone(GoneAnswer::Removed) => Verdict::Chat {
                count: generated(),
                status: "removed".to_owned(),
            },
            Presence::Gone(GoneAnswer::Left) => Verdict::Chat {
                count: generated(),
                status: "left".to_owned(),
            },
            Presence::Active => Verdict::Chat {
                count: chosen.participants_count.or_else(generated),
                status: chosen.status.unwrap_or_else(|| "active".to_owned()),
            },
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

async fn post_join(State(sim): State<Simulator>, Path(chat_id): Path<i64>) -> StatusCode {
    sim.join(chat_id);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct NotJoinedQuery {
    /// Join by itself after this many seconds; absent: only `POST /_sim/join/{chat_id}`.
    join_after_secs: Option<u64>,
}

async fn post_not_joined(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Query(query): Query<NotJoinedQuery>,
) -> StatusCode {
    sim.not_joined(chat_id, query.join_after_secs.map(Duration::from_secs));
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    fn population(removed_permille: u32, not_joined_permille: u32) -> SimConfig {
        SimConfig {
            removed_permille,
            not_joined_permille,
            ..SimConfig::default()
        }
    }

    /// The chat ids of the first `n` chats of a bench or test table.
    fn ids(n: i64) -> impl Iterator<Item = i64> {
        (1..=n).map(|g| -70_000_000_000_000 - g)
    }

    fn http() -> reqwest::Client {
        shared::tls::init();
        reqwest::Client::new()
    }

    async fn get(address: SocketAddr, chat_id: i64) -> (u16, String, String) {
        let response = http()
            .get(format!("http://{address}/chats/{chat_id}"))
            .header("authorization", "sim-token")
            .send()
            .await
            .expect("simulator answers");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (
            status,
            content_type,
            response.text().await.unwrap_or_default(),
        )
    }

    async fn post(address: SocketAddr, path: &str, body: serde_json::Value) -> u16 {
        http()
            .post(format!("http://{address}{path}"))
            .json(&body)
            .send()
            .await
            .expect("simulator answers")
            .status()
            .as_u16()
    }

    #[test]
    fn the_default_config_has_no_population() {
        let config = SimConfig::default();
        assert!(
            ids(5_000).all(|id| presence(&config, id, None, Duration::ZERO) == Presence::Active)
        );
    }

    #[test]
    fn a_config_of_an_older_release_still_parses_with_the_population_off() {
        let config: SimConfig =
            serde_json::from_str(r#"{"rate_limit": 7, "removed_permille": 20}"#).unwrap();
        assert_eq!((config.rate_limit, config.removed_permille), (7, 20));
        assert_eq!(config.not_joined_permille, 0);
        assert_eq!(config.join_after_secs, None);
        assert_eq!((config.not_a_chat_rate, config.no_count_rate), (0.0, 0.0));
    }

    #[test]
    fn gone_chats_are_their_share_answer_every_way_and_always_the_same() {
        let config = population(30, 0);
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for id in ids(20_000) {
            let first = presence(&config, id, None, Duration::ZERO);
            let later = presence(
                &config,
                id,
                Some(Membership::Joined),
                Duration::from_secs(9),
            );
            if let Presence::Gone(answer) = first {
                assert_eq!(
                    later, first,
                    "a chat gone for good stays gone, joined or not"
                );
                *kinds.entry(format!("{answer:?}")).or_default() += 1;
            }
        }
        let gone: usize = kinds.values().sum();
        assert!((500..700).contains(&gone), "{gone} of 20000 gone at 3%");
        for kind in ["NotFound", "Denied", "Removed", "Left"] {
            assert!(
                kinds.get(kind).is_some_and(|n| *n > 80),
                "{kind}: {kinds:?}"
            );
        }
    }

    #[test]
    fn chats_not_joined_yet_never_overlap_gone_ones_and_join_on_time() {
        let config = SimConfig {
            join_after_secs: Some(60),
            join_spread_secs: 60,
            ..population(30, 20)
        };
        let (mut not_joined, mut joined_by_90s) = (0, 0);
        for id in ids(20_000) {
            let at = |secs| presence(&config, id, None, Duration::from_secs(secs));
            if at(0) == Presence::NotJoined {
                not_joined += 1;
                assert_eq!(at(59), Presence::NotJoined);
                assert_eq!(at(120), Presence::Active, "joined by the end of the spread");
                joined_by_90s += usize::from(at(90) == Presence::Active);
            }
        }
        assert!(
            (320..480).contains(&not_joined),
            "{not_joined} of 20000 at 2%"
        );
        let share = joined_by_90s as f64 / not_joined as f64;
        assert!(
            (0.35..0.65).contains(&share),
            "joins spread: {share} by midway"
        );
        // Without a moment set they wait for `POST /_sim/join`, however long.
        let never = population(0, 20);
        let forever = Duration::from_secs(1 << 30);
        assert!(ids(20_000)
            .all(|id| presence(&never, id, None, Duration::ZERO)
                == presence(&never, id, None, forever)));
    }

    #[test]
    fn an_explicit_membership_wins_over_the_population() {
        let config = population(0, 1000);
        let id = -70_000_000_000_001;
        assert_eq!(
            presence(&config, id, None, Duration::ZERO),
            Presence::NotJoined
        );
        assert_eq!(
            presence(&config, id, Some(Membership::Joined), Duration::ZERO),
            Presence::Active
        );
        let later = Some(Membership::NotJoined {
            joins_at: Some(Duration::from_secs(5)),
        });
        let quiet = SimConfig::default();
        assert_eq!(
            presence(&quiet, id, later, Duration::from_secs(4)),
            Presence::NotJoined
        );
        assert_eq!(
            presence(&quiet, id, later, Duration::from_secs(5)),
            Presence::Active
        );
    }

    #[tokio::test]
    async fn gone_chats_answer_404_403_or_a_non_active_status() {
        let (sim, address) = Simulator::spawn(SimConfig {
            rate_limit: 0,
            ..population(1000, 0)
        })
        .await;
        let mut seen = std::collections::BTreeSet::new();
        for id in ids(40) {
            let Presence::Gone(answer) = sim.presence_of(id) else {
                panic!("every chat is gone at 1000 per mille");
            };
            let (status, _, body) = get(address, id).await;
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            match answer {
                GoneAnswer::NotFound => {
                    assert_eq!((status, &body["code"]), (404, &json!("not.found")))
                }
                GoneAnswer::Denied => {
                    assert_eq!((status, &body["code"]), (403, &json!("chat.denied")))
                }
                GoneAnswer::Removed => {
                    assert_eq!((status, &body["status"]), (200, &json!("removed")))
                }
                GoneAnswer::Left => assert_eq!((status, &body["status"]), (200, &json!("left"))),
            }
            assert!(!sim.is_active(id));
            seen.insert(format!("{answer:?}"));
        }
        assert_eq!(seen.len(), 4, "40 chats show every answer: {seen:?}");
    }

    #[tokio::test]
    async fn a_chat_the_bot_is_not_in_answers_403_until_it_joins() {
        let (sim, address) = Simulator::spawn(SimConfig::default()).await;
        let id = -70_000_000_000_001;
        assert_eq!(
            post(address, &format!("/_sim/not-joined/{id}"), json!({})).await,
            204
        );
        let (status, _, body) = get(address, id).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("chat.denied"), "{body}");
        assert!(!sim.is_active(id));
        assert_eq!(
            post(address, &format!("/_sim/join/{id}"), json!({})).await,
            204
        );
        let (status, _, body) = get(address, id).await;
        assert_eq!(status, 200);
        assert!(body.contains(r#""status":"active""#), "{body}");
        assert!(sim.is_active(id));
        assert_eq!(sim.stats().denied, 1);
    }

    #[tokio::test]
    async fn the_population_is_set_at_run_time_and_joins_when_configured() {
        let (sim, address) = Simulator::spawn(SimConfig::default()).await;
        let id = -70_000_000_000_002;
        let set = |body| post(address, "/_sim/config", body);
        assert_eq!(set(json!({"not_joined_permille": 1000})).await, 200);
        assert_eq!(get(address, id).await.0, 403, "not joined, no moment set");
        assert_eq!(set(json!({"join_after_secs": 0})).await, 200);
        assert_eq!(
            get(address, id).await.0,
            200,
            "joined: the moment has passed"
        );
        assert_eq!(sim.config().join_after_secs, Some(0));
        assert_eq!(set(json!({"join_after_secs": "soon"})).await, 400);
    }

    #[tokio::test]
    async fn not_a_chat_answers_are_an_html_page_or_a_chat_without_its_count() {
        let (sim, address) = Simulator::spawn(SimConfig {
            not_a_chat_rate: 1.0,
            ..SimConfig::default()
        })
        .await;
        let id = -70_000_000_000_003;
        let (status, content_type, body) = get(address, id).await;
        assert_eq!(status, 200);
        assert!(content_type.starts_with("text/html"), "{content_type}");
        assert!(body.starts_with("<!DOCTYPE html>"), "{body}");

        sim.update(|c| {
            c.not_a_chat_rate = 0.0;
            c.no_count_rate = 1.0;
        });
        let (status, content_type, body) = get(address, id).await;
        let chat: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!((status, content_type.as_str()), (200, "application/json"));
        assert_eq!(chat["status"], "active");
        assert!(chat.get("participants_count").is_none(), "{body}");

        sim.update(|c| c.no_count_rate = 0.0);
        let (_, _, body) = get(address, id).await;
        let chat: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(chat["participants_count"], sim.count_of(id));
        let stats = sim.stats();
        assert_eq!((stats.not_a_chat, stats.ok), (2, 1));
    }
}
