//! The Updates MAX sends (their JSON shapes, `MAX_EVENTS.md` §1.1), the log of every event
//! emitted, and the step that hands each one to its channel: the webhook subscriptions when
//! there are any, else the long-poll queue, with the injected duplicates and reordering.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{now_ms, Simulator, State_};

/// The user id of the chats' owner, who adds and removes the bot and renames chats.
pub(crate) const OWNER_ID: i64 = 123_123_123;

/// The log keeps at most this many events (the oldest go first).
const LOG_CAPACITY: usize = 200_000;

/// One event as the simulator emitted it, before any channel; `seq` counts from 1.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SimEvent {
    pub seq: u64,
    pub update: Value,
}

#[derive(Default)]
pub(crate) struct EventLog {
    entries: VecDeque<SimEvent>,
    next_seq: u64,
}

/// One copy of an event on its way to a channel.
pub(crate) struct Outgoing {
    pub(crate) seq: u64,
    pub(crate) update: Value,
    /// When the event happened: the webhook's give-up counts from it.
    pub(crate) happened: Instant,
    /// Not handed over before this (an injected reordering).
    pub(crate) not_before: Instant,
    /// The second copy of a duplicated event.
    pub(crate) duplicate: bool,
}

/// A MAX `User` for a synthetic user id.
pub(crate) fn user(user_id: i64) -> Value {
    let first_name = format!("User{user_id}");
    json!({
        "user_id": user_id,
        "first_name": first_name,
        "last_name": null,
        "username": null,
        "is_bot": false,
        "last_activity_time": now_ms(),
        "name": first_name,
    })
}

fn envelope(update_type: &str, chat_id: i64) -> serde_json::Map<String, Value> {
    let mut fields = serde_json::Map::new();
    fields.insert("update_type".into(), update_type.into());
    fields.insert("timestamp".into(), now_ms().into());
    fields.insert("chat_id".into(), chat_id.into());
    fields
}

/// `user_added`: `user` joined; `inviter_id` is absent when they joined by a link (as in the
/// captured payload).
pub(crate) fn user_added(chat_id: i64, user_id: i64, inviter_id: Option<i64>) -> Value {
    let mut fields = envelope("user_added", chat_id);
    fields.insert("user".into(), user(user_id));
    if let Some(inviter) = inviter_id {
        fields.insert("inviter_id".into(), inviter.into());
    }
    fields.insert("is_channel".into(), false.into());
    Value::Object(fields)
}

/// `user_removed`: `user` left; `admin_id` is absent when they left by themselves.
pub(crate) fn user_removed(chat_id: i64, user_id: i64, admin_id: Option<i64>) -> Value {
    let mut fields = envelope("user_removed", chat_id);
    fields.insert("user".into(), user(user_id));
    if let Some(admin) = admin_id {
        fields.insert("admin_id".into(), admin.into());
    }
    fields.insert("is_channel".into(), false.into());
    Value::Object(fields)
}

/// `bot_added` / `bot_removed`: `user` is who added or removed the bot.
pub(crate) fn bot_update(update_type: &str, chat_id: i64) -> Value {
    let mut fields = envelope(update_type, chat_id);
    fields.insert("user".into(), user(OWNER_ID));
    fields.insert("is_channel".into(), false.into());
    Value::Object(fields)
}

/// `chat_title_changed`: `user` renamed the chat to `title`.
pub(crate) fn chat_title_changed(chat_id: i64, title: &str) -> Value {
    let mut fields = envelope("chat_title_changed", chat_id);
    fields.insert("user".into(), user(OWNER_ID));
    fields.insert("title".into(), title.into());
    Value::Object(fields)
}

impl State_ {
    /// Logs an event and sends it on: one copy, or two (`duplicate_rate`), each held back by
    /// a random delay when `reorder_rate` says so. A copy not held back goes to the long-poll
    /// queue at once when no webhook is subscribed; every other copy goes through `outbox` to
    /// the dispatcher (`delivery::run_dispatcher`).
    pub(crate) fn emit(&mut self, update: Value) {
        self.events.next_seq += 1;
        let seq = self.events.next_seq;
        if self.events.entries.len() >= LOG_CAPACITY {
            self.events.entries.pop_front();
        }
        self.events.entries.push_back(SimEvent {
            seq,
            update: update.clone(),
        });
        let config = &self.config;
        let mut rng = rand::thread_rng();
        let copies = if rng.gen_bool(config.duplicate_rate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        let happened = Instant::now();
        for copy in 0..copies {
            let delay = if rng.gen_bool(config.reorder_rate.clamp(0.0, 1.0)) {
                config.scaled(rng.gen_range(0.0..=config.reorder_max_secs.max(0.0)))
            } else {
                Duration::ZERO
            };
            let outgoing = Outgoing {
                seq,
                update: update.clone(),
                happened,
                not_before: happened + delay,
                duplicate: copy == 1,
            };
            if delay.is_zero() && !self.delivery.has_subscriptions() {
                self.updates.push(outgoing.update);
            } else {
                self.delivery.send(outgoing);
            }
        }
    }
}

impl Simulator {
    /// Every event emitted so far (up to the last 200,000), oldest first.
    pub fn events(&self) -> Vec<SimEvent> {
        self.lock().events.entries.iter().cloned().collect()
    }
}

pub(crate) async fn get_events(State(sim): State<Simulator>) -> Json<Vec<SimEvent>> {
    Json(sim.events())
}
