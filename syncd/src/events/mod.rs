//! Membership events (SPEC §10): MAX's `user_added`, `user_removed`, `bot_added`,
//! `bot_removed` and `chat_title_changed`, taken in and applied to counts.
//!
//! - `webhook`: the receiver (`MAX_UPDATES_MODE=webhook`) that stores each raw update in the
//!   events stream before answering 200.
//! - `intake`: the consumer group reader of the events stream (ours, or another service's in
//!   `stream` mode) and `Registers`, the seam to the count writes (not wired yet).
//! - `update`: the typed `Update`, parsed at the edge. `register`: pure, the per-(chat, user)
//!   membership register and `apply`, which decides each update's `Effect`s.
//! - `settings`: `MAX_UPDATES_MODE` and the settings of each mode.

pub mod intake;
pub mod register;
pub mod settings;
pub mod update;
pub mod webhook;
