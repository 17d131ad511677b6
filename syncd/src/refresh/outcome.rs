//! What a refresh came to, chat by chat, and which answers are evidence about the setup: the
//! one vocabulary the stream lanes, the sweeps and `syncd refresh` translate from.

use chrono::{DateTime, Utc};
use shared::sync_status::SyncStatus;

/// A refresh with at least this many answers from chats known active, or the latest
/// `SYSTEMIC_WINDOW` such answers, where this share was 403, 404 or not a chat, is a fault of
/// the setup, not of the chats: those chats are not marked, and calls stop as for an invalid
/// token. Answers of chats not known active (gone before, or never refreshed: a bot not yet
/// added) are those chats' outcome and are never evidence against the setup.
pub(super) const SYSTEMIC_MIN_ASKED: usize = 10;
pub(super) const SYSTEMIC_SHARE: f64 = 0.8;
pub(super) const SYSTEMIC_WINDOW: usize = 50;

/// MAX would not show the chat: 403 or 404 (not a chat whose own status says it is gone).
pub(super) fn is_unavailable(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Gone { status, .. } if status.is_unavailable())
}

/// An answer that, from a chat known active, speaks against the setup: 403, 404, not a chat.
pub(super) fn is_bad_answer(outcome: &Outcome) -> bool {
    is_unavailable(outcome)
        || matches!(
            outcome,
            Outcome::Failed {
                reason: Unsettled::Unusable { .. },
                ..
            }
        )
}

/// What happened to one chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// MAX gave a count.
    Fresh { count: i32, asked_at: DateTime<Utc> },
    /// MAX says the bot cannot see this chat (non-active status, 403, 404) or its id is unusable.
    Gone {
        status: SyncStatus,
        asked_at: DateTime<Utc>,
    },
    /// No count and no status: see `Unsettled`.
    Failed {
        reason: Unsettled,
        asked_at: DateTime<Utc>,
    },
    /// The token is invalid: nothing was asked.
    TokenInvalid,
}

/// Why a chat got neither a count nor a status of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unsettled {
    /// A passing MAX failure (the error's kind) that outlasted the retries while MAX answered
    /// other chats: the chat's own, recorded, and tried again after its backoff.
    Max(&'static str),
    /// A passing failure while MAX fails for every chat (a streak of failures across chats, or
    /// 429s): MAX's outage, not the chat's; nothing is recorded of the chat.
    Outage(&'static str),
    /// MAX answered something that is not this chat (see `MaxError::Unexpected`): the chat's
    /// own failure while MAX gives other chats.
    Unusable { kind: &'static str, detail: String },
    /// Not asked: Redis, which holds the fleet's rate limit, could not be reached.
    LimiterUnavailable,
    /// A chat known active answered 403/404 or not a chat, and no control call could tell
    /// whether MAX gives other chats: nothing is recorded; it is asked again later.
    Unconfirmed,
    /// Not asked: the caller stopped the refresh (a sweep handing its work back).
    Stopped,
    /// Not asked: this process is shutting down.
    ShuttingDown,
    /// Asked, but MAX answered this (403/404's status, or `not_a_chat`) for nearly every chat
    /// known active: a fault of the setup, not the chat's, so nothing is recorded of the chat.
    Systemic(String),
}

impl Unsettled {
    /// The chat's own failure, recorded against it (the others are not the chat's fault).
    pub fn is_the_chats(&self) -> bool {
        matches!(self, Unsettled::Max(_) | Unsettled::Unusable { .. })
    }
}

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsettled::Max(kind) | Unsettled::Outage(kind) => f.write_str(kind),
            Unsettled::Unusable { kind, detail } => write!(f, "{kind}: {detail}"),
            Unsettled::LimiterUnavailable => f.write_str("limiter_unavailable"),
            Unsettled::Unconfirmed => f.write_str("unconfirmed"),
            Unsettled::Stopped => f.write_str("stopped"),
            Unsettled::ShuttingDown => f.write_str("shutting_down"),
            Unsettled::Systemic(status) => write!(f, "systemic_{status}"),
        }
    }
}

impl Outcome {
    /// Whether a MAX call was made for the chat (not stopped before it, nor refused for the
    /// token).
    pub fn asked_max(&self) -> bool {
        match self {
            Outcome::Fresh { .. } => true,
            Outcome::Gone { status, .. } => *status != SyncStatus::InvalidId,
            Outcome::Failed { reason, .. } => {
                matches!(
                    reason,
                    Unsettled::Max(_)
                        | Unsettled::Outage(_)
                        | Unsettled::Unusable { .. }
                        | Unsettled::Unconfirmed
                        | Unsettled::Systemic(_)
                )
            }
            Outcome::TokenInvalid => false,
        }
    }

    /// Whether calls stopped: the token was rejected, or MAX answered 403/404 or not a chat for
    /// nearly every chat known active (a fault of the setup).
    pub fn stopped_calls(&self) -> bool {
        matches!(
            self,
            Outcome::TokenInvalid
                | Outcome::Failed {
                    reason: Unsettled::Systemic(_),
                    ..
                }
        )
    }

    /// Whether the chat needs no further attempt for now.
    pub fn is_settled(&self) -> bool {
        matches!(self, Outcome::Fresh { .. } | Outcome::Gone { .. })
    }

    pub(super) fn asked_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Outcome::Fresh { asked_at, .. }
            | Outcome::Gone { asked_at, .. }
            | Outcome::Failed { asked_at, .. } => Some(*asked_at),
            Outcome::TokenInvalid => None,
        }
    }
}

/// The answers of one refresh from chats known active (the only evidence against the setup).
#[derive(Default)]
pub(super) struct Evidence {
    pub(super) asked: usize,
    pub(super) bad: usize,
    /// Of the bad answers, how many were not a chat (the rest 403/404).
    unusable: usize,
}

impl Evidence {
    pub(super) fn note(&mut self, chunk: &[(i32, Outcome, bool)]) {
        for (_, outcome, known_active) in chunk {
            if !*known_active || !outcome.asked_max() {
                continue;
            }
            self.asked += 1;
            if is_bad_answer(outcome) {
                self.bad += 1;
                if !is_unavailable(outcome) {
                    self.unusable += 1;
                }
            }
        }
    }

    pub(super) fn is_systemic(&self) -> bool {
        self.asked >= SYSTEMIC_MIN_ASKED && self.bad as f64 >= SYSTEMIC_SHARE * self.asked as f64
    }

    /// What the setup's fault looks like, for the log and `max_last_error`.
    pub(super) fn kind(&self) -> &'static str {
        if self.unusable * 2 > self.bad {
            "not_a_chat"
        } else {
            "forbidden_or_not_found"
        }
    }
}
