//! The MAX `Update`, parsed at the edge (MAX_EVENTS.md §1.1): the five membership types
//! typed, any other type kept by name, unknown fields ignored. The affected user is
//! `user.user_id`, as the schema and a real capture say; a top-level `user_id` (seen in one
//! client's fixtures, differing from `user.user_id`) is reported, never used.

use serde::Deserialize;

/// An update syncd understands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    UserAdded(Membership),
    UserRemoved(Membership),
    /// The bot was added to the chat (`user` is who added it).
    BotAdded {
        chat_id: i64,
        at_ms: i64,
    },
    /// The bot was removed from the chat.
    BotRemoved {
        chat_id: i64,
        at_ms: i64,
    },
    ChatTitleChanged {
        chat_id: i64,
        at_ms: i64,
    },
    /// A valid update of another type (another service's stream may carry messages too).
    Other {
        update_type: String,
        at_ms: i64,
    },
}

/// A user joining or leaving a chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    pub chat_id: i64,
    pub user_id: i64,
    /// When it happened, Unix milliseconds (MAX's `timestamp`).
    pub at_ms: i64,
}

/// An update and what parsing it noticed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub update: Update,
    /// A top-level `user_id` that differs from `user.user_id` (MAX_EVENTS.md §1.1 "stab quirk").
    pub differing_user_id: Option<i64>,
}

/// Why a body is not an update.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAnUpdate {
    #[error("not JSON: {0}")]
    Json(String),
    #[error("not an Update: {0}")]
    Envelope(String),
    #[error("a {update_type} update without a valid {field}")]
    Field {
        update_type: String,
        field: &'static str,
    },
}

impl NotAnUpdate {
    /// The dead-letter reason.
    pub fn reason(&self) -> &'static str {
        "not_an_update"
    }
}

#[derive(Deserialize)]
struct Envelope {
    update_type: String,
    timestamp: i64,
}

#[derive(Deserialize)]
struct User {
    user_id: i64,
}

#[derive(Deserialize)]
struct Body {
    chat_id: Option<i64>,
    user: Option<User>,
    user_id: Option<i64>,
}

impl Update {
    /// Parses one raw update (a webhook body, or an events stream entry's `update` field).
    pub fn parse(raw: &[u8]) -> Result<Parsed, NotAnUpdate> {
        let value: serde_json::Value =
            serde_json::from_slice(raw).map_err(|e| NotAnUpdate::Json(e.to_string()))?;
        let envelope =
            Envelope::deserialize(&value).map_err(|e| NotAnUpdate::Envelope(e.to_string()))?;
        let at_ms = envelope.timestamp;
        if at_ms <= 0 {
            return Err(NotAnUpdate::Envelope(
                "timestamp must be positive".to_owned(),
            ));
        }
        let kind = envelope.update_type;
        let known = matches!(
            kind.as_str(),
            "user_added" | "user_removed" | "bot_added" | "bot_removed" | "chat_title_changed"
        );
        if !known {
            return Ok(Parsed {
                update: Update::Other {
                    update_type: kind,
                    at_ms,
                },
                differing_user_id: None,
            });
        }
        let missing = |field| NotAnUpdate::Field {
            update_type: kind.clone(),
            field,
        };
        let body = Body::deserialize(&value).map_err(|_| missing("body"))?;
        let chat_id = body.chat_id.ok_or_else(|| missing("chat_id"))?;
        let update = match kind.as_str() {
            "user_added" | "user_removed" => {
                let user_id = body
                    .user
                    .as_ref()
                    .ok_or_else(|| missing("user.user_id"))?
                    .user_id;
                let membership = Membership {
                    chat_id,
                    user_id,
                    at_ms,
                };
                let differing_user_id = body.user_id.filter(|top| *top != user_id);
                let update = if kind == "user_added" {
                    Update::UserAdded(membership)
                } else {
                    Update::UserRemoved(membership)
                };
                return Ok(Parsed {
                    update,
                    differing_user_id,
                });
            }
            "bot_added" => Update::BotAdded { chat_id, at_ms },
            "bot_removed" => Update::BotRemoved { chat_id, at_ms },
            _ => Update::ChatTitleChanged { chat_id, at_ms },
        };
        Ok(Parsed {
            update,
            differing_user_id: None,
        })
    }

    /// The chat it is about (`None` for other types).
    pub fn chat_id(&self) -> Option<i64> {
        match self {
            Update::UserAdded(m) | Update::UserRemoved(m) => Some(m.chat_id),
            Update::BotAdded { chat_id, .. }
            | Update::BotRemoved { chat_id, .. }
            | Update::ChatTitleChanged { chat_id, .. } => Some(*chat_id),
            Update::Other { .. } => None,
        }
    }

    /// When it happened, Unix milliseconds.
    pub fn at_ms(&self) -> i64 {
        match self {
            Update::UserAdded(m) | Update::UserRemoved(m) => m.at_ms,
            Update::BotAdded { at_ms, .. }
            | Update::BotRemoved { at_ms, .. }
            | Update::ChatTitleChanged { at_ms, .. }
            | Update::Other { at_ms, .. } => *at_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Parsed, NotAnUpdate> {
        Update::parse(text.as_bytes())
    }

    #[test]
    fn a_real_user_added_payload_parses_with_the_user_from_user_user_id() {
        // MAX_EVENTS.md §1.1: the captured payload (Feb 2026).
        let parsed = parse(r#"{"chat_id":-100000000,"user":{"user_id":55555,"first_name":"A","is_bot":false,"last_activity_time":1739183990000},"is_channel":true,"timestamp":1739184000000,"update_type":"user_added"}"#).unwrap();
        assert_eq!(
            parsed.update,
            Update::UserAdded(Membership {
                chat_id: -100000000,
                user_id: 55555,
                at_ms: 1739184000000
            })
        );
        assert_eq!(parsed.differing_user_id, None);
    }

    #[test]
    fn a_differing_top_level_user_id_is_reported_and_not_used() {
        // The go-v2 fixture's shape: `user_id` beside `user`, and `inviter_id`.
        let parsed = parse(r#"{"update_type":"user_removed","timestamp":1775025604499,"chat_id":-7,"user":{"user_id":123456789},"user_id":234567890,"inviter_id":123456789,"admin_id":null}"#).unwrap();
        let Update::UserRemoved(m) = parsed.update else {
            panic!("{parsed:?}")
        };
        assert_eq!(m.user_id, 123456789);
        assert_eq!(parsed.differing_user_id, Some(234567890));
        let same = parse(r#"{"update_type":"user_added","timestamp":1,"chat_id":-7,"user":{"user_id":5},"user_id":5}"#).unwrap();
        assert_eq!(same.differing_user_id, None);
    }

    #[test]
    fn bot_and_title_updates_and_other_types_parse() {
        let at = r#""timestamp":1775025604499"#;
        let cases = [
            (
                format!(
                    r#"{{"update_type":"bot_added",{at},"chat_id":-1,"user":{{"user_id":9}},"is_channel":false}}"#
                ),
                Update::BotAdded {
                    chat_id: -1,
                    at_ms: 1775025604499,
                },
            ),
            (
                format!(
                    r#"{{"update_type":"bot_removed",{at},"chat_id":-2,"user":{{"user_id":9}}}}"#
                ),
                Update::BotRemoved {
                    chat_id: -2,
                    at_ms: 1775025604499,
                },
            ),
            (
                format!(
                    r#"{{"update_type":"chat_title_changed",{at},"chat_id":-3,"user":{{"user_id":9}},"title":"t"}}"#
                ),
                Update::ChatTitleChanged {
                    chat_id: -3,
                    at_ms: 1775025604499,
                },
            ),
            (
                format!(r#"{{"update_type":"message_created",{at},"message":{{}}}}"#),
                Update::Other {
                    update_type: "message_created".into(),
                    at_ms: 1775025604499,
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(&text).unwrap().update, want, "{text}");
        }
    }

    #[test]
    fn bodies_that_are_not_updates_say_why() {
        assert!(matches!(parse("not json"), Err(NotAnUpdate::Json(_))));
        assert!(matches!(parse("[1,2]"), Err(NotAnUpdate::Envelope(_))));
        assert!(matches!(
            parse(r#"{"timestamp":1}"#),
            Err(NotAnUpdate::Envelope(_))
        ));
        assert!(matches!(
            parse(r#"{"update_type":"user_added"}"#),
            Err(NotAnUpdate::Envelope(_))
        ));
        assert!(matches!(
            parse(r#"{"update_type":"user_added","timestamp":"soon"}"#),
            Err(NotAnUpdate::Envelope(_))
        ));
        assert_eq!(
            parse(r#"{"update_type":"user_added","timestamp":1,"chat_id":-1}"#).unwrap_err(),
            NotAnUpdate::Field {
                update_type: "user_added".into(),
                field: "user.user_id"
            }
        );
        assert_eq!(
            parse(r#"{"update_type":"bot_added","timestamp":1}"#).unwrap_err(),
            NotAnUpdate::Field {
                update_type: "bot_added".into(),
                field: "chat_id"
            }
        );
    }
}
