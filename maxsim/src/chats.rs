//! `GET /chats/{chatId}`: the population (gone, not joined yet, active), injected faults, and
//! the Chat JSON; the controls that set one chat's answer or the bot's place in it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::Rng;
use serde::Deserialize;
use serde_json::json;

use crate::{error, hash_of, too_many_requests, ChatOverride, SimConfig, Simulator, State_};

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

/// A membership set for one chat through `join`, `not_joined` or `leave`, over the
/// population's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Membership {
    Joined,
    /// Joins at this time since the simulator started, or only when told.
    NotJoined {
        joins_at: Option<Duration>,
    },
}

impl Simulator {
    /// The bot joins the chat now (it answers as active from now on, unless gone for good);
    /// `bot_added` goes out if it was not in.
    pub fn join(&self, chat_id: i64) {
        let mut state = self.lock();
        state.catch_up(chat_id);
        state.membership.insert(chat_id, Membership::Joined);
        state.catch_up(chat_id);
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

    /// The count the simulator currently reports for a chat: its override, else its base with
    /// drift and membership changes (`members`).
    pub fn count_of(&self, chat_id: i64) -> i32 {
        let mut state = self.lock();
        if let Some(count) = state
            .overrides
            .get(&chat_id)
            .and_then(|o| o.participants_count)
        {
            return count;
        }
        state.current_count(chat_id)
    }
}

/// The count a chat starts with, by its id.
pub(crate) fn base_count(chat_id: i64) -> i32 {
    2 + (hash_of(&[chat_id]) % 500) as i32
}

/// How far the drift has moved a chat's count from its base in `epoch` (a count of
/// `churn_period_secs` since the Unix epoch): up to ±10, never below a count of 1.
pub(crate) fn drift_at(chat_id: i64, churn_period_secs: u64, epoch: i64) -> i32 {
    if churn_period_secs == 0 {
        return 0;
    }
    let base = base_count(chat_id);
    let delta = (hash_of(&[chat_id, epoch]) % 21) as i32 - 10;
    (base + delta).max(1) - base
}

/// The count with the drift of now and no membership changes (a chat gone for good).
pub(crate) fn generated_count(chat_id: i64, churn_period_secs: u64) -> i32 {
    if churn_period_secs == 0 {
        return base_count(chat_id);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let epoch = (now / churn_period_secs) as i64;
    base_count(chat_id) + drift_at(chat_id, churn_period_secs, epoch)
}

/// Where a chat stands in the population: gone for good, not joined yet, or active. An
/// explicit membership (`join`, `not_joined`) wins over the population's, a gone chat over both.
pub(crate) fn presence(
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
        title: String,
    },
    /// 200 with an HTML page.
    NotAChat,
}

pub(crate) async fn get_chat(
    State(sim): State<Simulator>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (delay, verdict) = sim.decide(&chat_id, &headers);
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
        Verdict::Chat {
            count,
            status,
            title,
        } => Json(chat_body(
            chat_id.parse().unwrap_or_default(),
            count,
            &status,
            &title,
        ))
        .into_response(),
    }
}

/// MAX's Chat JSON, with fields this service does not read, and one it cannot know yet.
fn chat_body(id: i64, count: Option<i32>, status: &str, title: &str) -> serde_json::Value {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64;
    let mut body = json!({
        "chat_id": id,
        "type": "chat",
        "status": status,
        "title": title,
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
    fn decide(&self, chat_id: &str, headers: &HeaderMap) -> (Duration, Verdict) {
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
        let verdict = if let Some(refused) = state.refuse_token(headers) {
            Verdict::Answer(refused)
        } else if !state.admit(config.rate_limit) {
            state.stats.rate_limited += 1;
            Verdict::Answer(too_many_requests())
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
                title: self.title_of(id),
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
        // Known from now on, so that its joins and changes emit events by themselves.
        self.catch_up(id);
        let membership = self.membership.get(&id).copied();
        let generated = || Some(generated_count(id, config.churn_period_secs));
        let title = self.title_of(id);
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
                title,
            },
            Presence::Gone(GoneAnswer::Left) => Verdict::Chat {
                count: generated(),
                status: "left".to_owned(),
                title,
            },
            Presence::Active => Verdict::Chat {
                count: Some(
                    chosen
                        .participants_count
                        .unwrap_or_else(|| self.current_count(id)),
                ),
                status: chosen.status.unwrap_or_else(|| "active".to_owned()),
                title,
            },
        }
    }
}

pub(crate) async fn put_chat(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Json(answer): Json<ChatOverride>,
) -> StatusCode {
    sim.override_chat(chat_id, answer);
    StatusCode::NO_CONTENT
}

pub(crate) async fn post_join(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
) -> StatusCode {
    sim.join(chat_id);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(crate) struct NotJoinedQuery {
    /// Join by itself after this many seconds; absent: only `POST /_sim/join/{chat_id}`.
    join_after_secs: Option<u64>,
}

pub(crate) async fn post_not_joined(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Query(query): Query<NotJoinedQuery>,
) -> StatusCode {
    sim.not_joined(chat_id, query.join_after_secs.map(Duration::from_secs));
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;

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
