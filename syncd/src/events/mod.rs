//! Membership events (SPEC §10): MAX's `user_added`, `user_removed`, `bot_added`,
//! `bot_removed` and `chat_title_changed`, taken in and applied to counts.
//!
//! - `webhook`: the receiver (`MAX_UPDATES_MODE=webhook`) that stores each raw update in the
//!   events stream before answering 200.
//! - `intake`: the consumer group reader of the events stream (ours, or another service's in
//!   `stream` mode) and `Registers`, the seam to the count writes (not wired yet).
//! - `update`: the typed `Update`, parsed at the edge. `register`: pure, the per-(chat, user)
//!   membership register and `apply`, which decides each update's `Effect`s.
//! - `poll`: the long poller (`MAX_UPDATES_MODE=poll`): one replica at a time, by a lease,
//!   stores each `GET /updates` batch in the events stream, then persists the marker.
//! - `subscription`: `syncd subscribe` and webhook mode's periodic check of the subscription.
//! - `settings`: `MAX_UPDATES_MODE` and the settings of each mode.

pub mod intake;
pub mod poll;
pub mod register;
pub mod settings;
pub mod subscription;
pub mod update;
pub mod webhook;

/// The membership update types syncd asks MAX for, by long poll or webhook.
pub const MEMBERSHIP_TYPES: [&str; 5] = [
    "user_added",
    "user_removed",
    "bot_added",
    "bot_removed",
    "chat_title_changed",
];
