//! Chat identifiers: `chats.id` is ours, `MaxChatId` is the messenger's.

use std::fmt;

/// A MAX chat id, parsed from the `chats.max_chat_id` text column. Group chats are negative.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MaxChatId(i64);

/// Why a `max_chat_id` value can never be sent to MAX.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidMaxChatId {
    #[error("max_chat_id is empty")]
    Empty,
    #[error("max_chat_id `{0}` is not a signed 64-bit integer")]
    NotANumber(String),
    #[error("max_chat_id is zero")]
    Zero,
}

impl MaxChatId {
    /// Parses the text form stored by the chat-service. Surrounding whitespace is tolerated
    /// because admins pasted these by hand; anything else that is not an integer is rejected.
    pub fn parse(text: &str) -> Result<Self, InvalidMaxChatId> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(InvalidMaxChatId::Empty);
        }
        let id: i64 = trimmed
            .parse()
            .map_err(|_| InvalidMaxChatId::NotANumber(trimmed.chars().take(64).collect()))?;
        if id == 0 {
            return Err(InvalidMaxChatId::Zero);
        }
        Ok(Self(id))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for MaxChatId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_chat_ids_are_negative_integers() {
        assert_eq!(
            MaxChatId::parse("-70000000000005").unwrap().get(),
            -70000000000005
        );
        assert_eq!(MaxChatId::parse(" 1234567890 ").unwrap().get(), 1234567890);
    }

    #[test]
    fn text_that_is_not_an_id_is_rejected() {
        assert_eq!(MaxChatId::parse(""), Err(InvalidMaxChatId::Empty));
        assert_eq!(MaxChatId::parse("0"), Err(InvalidMaxChatId::Zero));
        assert!(matches!(
            MaxChatId::parse("https://max.ru/join/x"),
            Err(InvalidMaxChatId::NotANumber(_))
        ));
        assert!(matches!(
            MaxChatId::parse("99999999999999999999"),
            Err(InvalidMaxChatId::NotANumber(_))
        ));
    }
}
