//! The bot's place and rights in each chat and the membership changes that move counts.
//!
//! A chat's count is its generated base, plus its drift (`churn_period_secs`), plus the joins
//! less the leaves of concrete users (synthetic ids). Where the bot is an administrator with
//! `read_all_messages` (`admin_permille`, or `POST /_sim/admin/{chat_id}`) every change emits
//! its event: `user_added`/`user_removed` (the drift too, as changes of fresh users),
//! `chat_title_changed`. Elsewhere counts change silently, as in MAX. The bot joining and
//! leaving emits `bot_added`/`bot_removed` in every chat. Whether membership events need
//! `read_all_messages` is unverified (`MAX_EVENTS.md` §1.2); the simulator takes the strict
//! reading.
//!
//! Background changes (time-based joins, drift, `member_changes_per_sec`) reach the chats the
//! simulator knows: those asked for once, touched by a control, or listed in `POST /_sim/chats`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::chats::{base_count, drift_at, presence, Membership};
use crate::events::{self, OWNER_ID};
use crate::{error, hash_of, now_ms, GoneAnswer, Presence, Simulator, State_};

/// Synthetic user ids start here; each new user takes the next one.
const FIRST_USER_ID: i64 = 1_000_000_001;

/// What an administrator bot may do, as `/members/me` lists it.
const ADMIN_PERMISSIONS: [&str; 6] = [
    "read_all_messages",
    "add_remove_members",
    "add_admins",
    "change_chat_info",
    "pin_message",
    "write",
];

/// The bot's rights in one chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRights {
    pub is_admin: bool,
    /// Without it an administrator bot gets no events but `bot_added`/`bot_removed`.
    #[serde(default = "yes")]
    pub read_all_messages: bool,
}

fn yes() -> bool {
    true
}

/// One membership change asked through `POST /_sim/members/{chat_id}`: exactly one of `add`
/// and `remove`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct MemberChange {
    /// The user who joins.
    pub add: Option<i64>,
    /// The user who leaves.
    pub remove: Option<i64>,
    /// Who added them (absent: joined by a link).
    pub inviter_id: Option<i64>,
    /// Who removed them (absent: left by themselves).
    pub admin_id: Option<i64>,
}

#[derive(Default)]
pub(crate) struct ChatState {
    /// Joins less leaves of users since the start.
    member_delta: i32,
    /// The users whose membership the simulator has set: true while they are in. A user never
    /// touched is taken as a member from before (when removed) or a newcomer (when added).
    touched: HashMap<i64, bool>,
    /// In a chat whose events reach the bot: the drift epoch and value already emitted as
    /// changes; elsewhere the drift is a pure function of time.
    drift: Option<(i64, i32)>,
    /// Whether the bot was in the chat at the last look: a change emits `bot_added`/`_removed`.
    bot_in: bool,
    title: Option<String>,
    admin: Option<AdminRights>,
}

#[derive(Default)]
pub(crate) struct Members {
    chats: HashMap<i64, ChatState>,
    /// The known chats in the order they became known, for random picks.
    known: Vec<i64>,
    next_user_id: i64,
    /// Background changes owed but not made yet (a fraction carries over).
    change_budget: f64,
}

impl Members {
    fn fresh_user(&mut self) -> i64 {
        if self.next_user_id < FIRST_USER_ID {
            self.next_user_id = FIRST_USER_ID;
        }
        self.next_user_id += 1;
        self.next_user_id - 1
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl State_ {
    fn presence_now(&self, chat_id: i64) -> Presence {
        presence(
            &self.config,
            chat_id,
            self.membership.get(&chat_id).copied(),
            self.started.elapsed(),
        )
    }

    /// The bot's rights: the chat's own, else the population's.
    pub(crate) fn admin_rights(&self, chat_id: i64) -> AdminRights {
        if let Some(rights) = self.members.chats.get(&chat_id).and_then(|c| c.admin) {
            return rights;
        }
        let is_admin = hash_of(&[chat_id, 23]) % 1000 < u64::from(self.config.admin_permille);
        AdminRights {
            is_admin,
            read_all_messages: is_admin,
        }
    }

    /// Whether MAX would send this chat's membership and title events to the bot.
    pub(crate) fn events_reach(&self, chat_id: i64) -> bool {
        let rights = self.admin_rights(chat_id);
        rights.is_admin
            && rights.read_all_messages
            && self.presence_now(chat_id) == Presence::Active
    }

    /// The chat's state, made known (silently: as it stands now) on first use.
    fn chat(&mut self, chat_id: i64) -> &mut ChatState {
        if !self.members.chats.contains_key(&chat_id) {
            let bot_in = self.presence_now(chat_id) == Presence::Active;
            self.members.known.push(chat_id);
            self.members.chats.insert(
                chat_id,
                ChatState {
                    bot_in,
                    ..ChatState::default()
                },
            );
        }
        self.members.chats.get_mut(&chat_id).expect("just inserted")
    }

    /// Brings a chat up to now: the bot's joins and leaves (time-based ones included) emit
    /// `bot_added`/`bot_removed`; in a chat whose events reach the bot, the drift since the
    /// last look is emitted as membership changes.
    pub(crate) fn catch_up(&mut self, chat_id: i64) {
        let bot_in = self.presence_now(chat_id) == Presence::Active;
        let period = self.config.churn_period_secs;
        let reach = bot_in && period > 0 && {
            let rights = self.admin_rights(chat_id);
            rights.is_admin && rights.read_all_messages
        };
        let state = self.chat(chat_id);
        if state.bot_in != bot_in {
            state.bot_in = bot_in;
            // The bot's count starts afresh from what MAX says once it is (back) in.
            state.drift = None;
            let kind = if bot_in { "bot_added" } else { "bot_removed" };
            self.emit(events::bot_update(kind, chat_id));
        }
        let state = self.chat(chat_id);
        if !reach || period == 0 {
            state.drift = None;
            return;
        }
        let epoch = (now_secs() / period) as i64;
        let target = drift_at(chat_id, period, epoch);
        let Some((seen_epoch, applied)) = state.drift else {
            state.drift = Some((epoch, target));
            return;
        };
        if seen_epoch == epoch {
            return;
        }
        state.drift = Some((epoch, target));
        let mut rng = rand::thread_rng();
        for _ in 0..(target - applied).abs() {
            let user_id = self.members.fresh_user();
            let by_owner = rng.gen_bool(0.5).then_some(OWNER_ID);
            self.emit(if target > applied {
                events::user_added(chat_id, user_id, by_owner)
            } else {
                events::user_removed(chat_id, user_id, by_owner)
            });
        }
    }

    /// Whether time alone can change the chat: the bot is not in (it may join), or the drift
    /// may have to be emitted. A cheap test, so that a scan of every known chat stays cheap.
    fn may_move_by_time(&self, chat_id: i64) -> bool {
        let Some(state) = self.members.chats.get(&chat_id) else {
            return true;
        };
        !state.bot_in
            || (self.config.churn_period_secs > 0
                && (self.config.admin_permille > 0 || state.admin.is_some()))
    }

    /// The count MAX reports now for an active chat (an override aside).
    pub(crate) fn current_count(&mut self, chat_id: i64) -> i32 {
        self.catch_up(chat_id);
        let period = self.config.churn_period_secs;
        let state = self.chat(chat_id);
        let drift = match state.drift {
            Some((_, applied)) => applied,
            None if period == 0 => 0,
            None => drift_at(chat_id, period, (now_secs() / period) as i64),
        };
        let delta = state.member_delta;
        (base_count(chat_id) + drift + delta).max(1)
    }

    /// Applies one membership change; the new count, or why it cannot be.
    pub(crate) fn change_member(
        &mut self,
        chat_id: i64,
        change: &MemberChange,
    ) -> Result<i32, String> {
        let (user_id, joins) = match (change.add, change.remove) {
            (Some(user_id), None) => (user_id, true),
            (None, Some(user_id)) => (user_id, false),
            _ => return Err("give exactly one of add and remove".to_owned()),
        };
        let count = self.current_count(chat_id);
        let state = self.chat(chat_id);
        match (joins, state.touched.get(&user_id)) {
            (true, Some(true)) => return Err(format!("user {user_id} is already a member")),
            (false, Some(false)) => return Err(format!("user {user_id} is not a member")),
            (false, _) if count <= 1 => return Err("the chat has no one left to remove".into()),
            _ => {}
        }
        state.touched.insert(user_id, joins);
        state.member_delta += if joins { 1 } else { -1 };
        if self.events_reach(chat_id) {
            self.emit(if joins {
                events::user_added(chat_id, user_id, change.inviter_id)
            } else {
                events::user_removed(chat_id, user_id, change.admin_id)
            });
        }
        Ok(self.current_count(chat_id))
    }

    /// One background change in a random known chat the bot is in: a newcomer joins, or a
    /// member (one who joined earlier, or one from before) leaves.
    fn change_at_random(&mut self, rng: &mut impl Rng) {
        let Some(&chat_id) = self.members.known.choose(rng) else {
            return;
        };
        if self.presence_now(chat_id) != Presence::Active {
            return;
        }
        let joins = rng.gen_bool(0.5) || self.current_count(chat_id) <= 2;
        let user_id = if joins {
            self.members.fresh_user()
        } else {
            let present: Vec<i64> = self
                .chat(chat_id)
                .touched
                .iter()
                .filter(|(_, in_chat)| **in_chat)
                .map(|(user, _)| *user)
                .collect();
            match present.choose(rng) {
                Some(user) if rng.gen_bool(0.5) => *user,
                _ => self.members.fresh_user(),
            }
        };
        let by_owner = rng.gen_bool(0.5).then_some(OWNER_ID);
        let change = MemberChange {
            add: joins.then_some(user_id),
            remove: (!joins).then_some(user_id),
            inviter_id: by_owner,
            admin_id: by_owner,
        };
        let _ = self.change_member(chat_id, &change);
    }
}

/// Every 250 ms: the background changes owed by `member_changes_per_sec`, and (at most once
/// a second, when something can change by time) every known chat caught up, so that joins and
/// drift emit their events without anyone asking.
pub(crate) async fn run_background(sim: Simulator) {
    let tick = Duration::from_millis(250);
    let mut last = Instant::now();
    let mut last_scan = Instant::now();
    loop {
        tokio::time::sleep(tick).await;
        let mut state = sim.lock();
        let elapsed = last.elapsed();
        last = Instant::now();
        let rate = state.config.member_changes_per_sec * state.config.scale();
        state.members.change_budget += rate * elapsed.as_secs_f64();
        let mut rng = rand::thread_rng();
        while state.members.change_budget >= 1.0 {
            state.members.change_budget -= 1.0;
            state.change_at_random(&mut rng);
        }
        let time_moves = state.config.churn_period_secs > 0
            || state.config.join_after_secs.is_some()
            || state
                .membership
                .values()
                .any(|m| matches!(m, Membership::NotJoined { joins_at: Some(_) }));
        if time_moves && last_scan.elapsed() >= Duration::from_secs(1) {
            last_scan = Instant::now();
            for n in 0..state.members.known.len() {
                let chat_id = state.members.known[n];
                if state.may_move_by_time(chat_id) {
                    state.catch_up(chat_id);
                }
            }
        }
    }
}

impl Simulator {
    /// Makes chats known, so background changes reach them.
    pub fn add_chats(&self, chat_ids: impl IntoIterator<Item = i64>) {
        let mut state = self.lock();
        for chat_id in chat_ids {
            state.catch_up(chat_id);
        }
    }

    /// Sets the bot's rights in one chat (over `admin_permille`).
    pub fn set_admin(&self, chat_id: i64, rights: AdminRights) {
        let mut state = self.lock();
        state.catch_up(chat_id);
        state.chat(chat_id).admin = Some(rights);
        // Newly reached: the drift so far is part of the count without events.
        state.catch_up(chat_id);
    }

    pub fn admin_rights(&self, chat_id: i64) -> AdminRights {
        self.lock().admin_rights(chat_id)
    }

    /// Whether the chat's membership and title events would reach the bot now.
    pub fn events_reach(&self, chat_id: i64) -> bool {
        self.lock().events_reach(chat_id)
    }

    /// One membership change: the count moves, and the event goes out where it reaches.
    pub fn change_member(&self, chat_id: i64, change: &MemberChange) -> Result<i32, String> {
        self.lock().change_member(chat_id, change)
    }

    /// `user_id` joins the chat by a link.
    pub fn add_member(&self, chat_id: i64, user_id: i64) -> Result<i32, String> {
        self.change_member(
            chat_id,
            &MemberChange {
                add: Some(user_id),
                ..MemberChange::default()
            },
        )
    }

    /// `user_id` leaves the chat by themselves.
    pub fn remove_member(&self, chat_id: i64, user_id: i64) -> Result<i32, String> {
        self.change_member(
            chat_id,
            &MemberChange {
                remove: Some(user_id),
                ..MemberChange::default()
            },
        )
    }

    /// The bot is removed from the chat: `bot_removed`, then 403 `chat.denied` until `join`.
    pub fn leave(&self, chat_id: i64) {
        let mut state = self.lock();
        state.catch_up(chat_id);
        state
            .membership
            .insert(chat_id, Membership::NotJoined { joins_at: None });
        state.catch_up(chat_id);
    }

    /// The chat is renamed: its title changes, and `chat_title_changed` goes out where events
    /// reach.
    pub fn rename(&self, chat_id: i64, title: &str) {
        let mut state = self.lock();
        state.catch_up(chat_id);
        state.chat(chat_id).title = Some(title.to_owned());
        if state.events_reach(chat_id) {
            state.emit(events::chat_title_changed(chat_id, title));
        }
    }

    /// The chat's title as `GET /chats/{id}` shows it.
    pub fn title_of(&self, chat_id: i64) -> String {
        self.lock().title_of(chat_id)
    }
}

impl State_ {
    pub(crate) fn title_of(&self, chat_id: i64) -> String {
        self.members
            .chats
            .get(&chat_id)
            .and_then(|c| c.title.clone())
            .unwrap_or_else(|| format!("chat {chat_id}"))
    }
}

/// MAX's `ChatMember` for the bot itself.
fn bot_member(bot_user_id: i64, rights: AdminRights) -> serde_json::Value {
    let now = now_ms();
    let permissions = rights.is_admin.then(|| {
        ADMIN_PERMISSIONS
            .iter()
            .filter(|p| rights.read_all_messages || **p != "read_all_messages")
            .collect::<Vec<_>>()
    });
    json!({
        "user_id": bot_user_id,
        "first_name": "Participants",
        "last_name": null,
        "username": "participants_bot",
        "is_bot": true,
        "last_activity_time": now,
        "name": "Participants",
        "description": null,
        "avatar_url": null,
        "full_avatar_url": null,
        "last_access_time": now,
        "is_owner": false,
        "is_admin": rights.is_admin,
        "join_time": now - 86_400_000,
        "permissions": permissions,
        "alias": null,
    })
}

/// `GET /chats/{chatId}/members/me`: the bot as a member, with its rights; 404/403 where
/// `GET /chats/{id}` answers them, and 403 for a chat the bot has left or was removed from.
pub(crate) async fn get_members_me(
    State(sim): State<Simulator>,
    Path(chat_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut state = sim.lock();
    if let Some(refused) = state.refuse(&headers) {
        return refused;
    }
    let Ok(chat_id) = chat_id.parse::<i64>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "proto.payload",
            "chatId must be an integer",
        );
    };
    if let Some(code) = state.overrides.get(&chat_id).and_then(|o| o.http_status) {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(status, "chat.denied", "overridden");
    }
    state.catch_up(chat_id);
    let denied = || {
        error(
            StatusCode::FORBIDDEN,
            "chat.denied",
            "bot is not a member of the chat",
        )
    };
    match state.presence_now(chat_id) {
        Presence::Gone(GoneAnswer::NotFound) => {
            error(StatusCode::NOT_FOUND, "not.found", "Chat not found")
        }
        Presence::Gone(_) | Presence::NotJoined => denied(),
        Presence::Active => Json(bot_member(
            state.config.bot_user_id,
            state.admin_rights(chat_id),
        ))
        .into_response(),
    }
}

pub(crate) async fn post_admin(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Json(rights): Json<AdminRights>,
) -> Json<AdminRights> {
    sim.set_admin(chat_id, rights);
    Json(sim.admin_rights(chat_id))
}

pub(crate) async fn get_admin(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
) -> Json<serde_json::Value> {
    let state = sim.lock();
    Json(json!({
        "rights": state.admin_rights(chat_id),
        "events_reach": state.events_reach(chat_id),
    }))
}

pub(crate) async fn post_member_change(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Json(change): Json<MemberChange>,
) -> Response {
    match sim.change_member(chat_id, &change) {
        Ok(count) => Json(json!({"participants_count": count})).into_response(),
        Err(message) => error(StatusCode::CONFLICT, "sim.member", &message),
    }
}

#[derive(Deserialize)]
pub(crate) struct TitleBody {
    title: String,
}

pub(crate) async fn post_title(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
    Json(body): Json<TitleBody>,
) -> StatusCode {
    sim.rename(chat_id, &body.title);
    StatusCode::NO_CONTENT
}

pub(crate) async fn post_leave(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
) -> StatusCode {
    sim.leave(chat_id);
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
pub(crate) struct KnownChats {
    chat_ids: Vec<i64>,
}

pub(crate) async fn post_known_chats(
    State(sim): State<Simulator>,
    Json(body): Json<KnownChats>,
) -> StatusCode {
    sim.add_chats(body.chat_ids);
    StatusCode::NO_CONTENT
}

/// The true count now, and whether events reach the chat: what a test compares against.
pub(crate) async fn get_count(
    State(sim): State<Simulator>,
    Path(chat_id): Path<i64>,
) -> Json<serde_json::Value> {
    let count = sim.count_of(chat_id);
    Json(json!({
        "participants_count": count,
        "events_reach": sim.events_reach(chat_id),
        "admin": sim.admin_rights(chat_id),
    }))
}
