//! Which chats a caller may see: the one rule every read applies, whatever serves it.

/// The chats a token grants: every chat, one university's, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    University(i32),
    /// A curator or operator token without a usable `university_id` sees nothing, not everything.
    Nothing,
}

impl Scope {
    /// Whether a chat of `university_id` lies in this scope.
    pub fn admits(self, university_id: Option<i32>) -> bool {
        match self {
            Scope::All => true,
            Scope::University(id) => university_id == Some(id),
            Scope::Nothing => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_university_scope_admits_only_its_own_chats() {
        assert!(Scope::All.admits(None));
        assert!(Scope::University(3).admits(Some(3)));
        assert!(!Scope::University(3).admits(Some(4)));
        assert!(!Scope::University(3).admits(None));
        assert!(!Scope::Nothing.admits(Some(3)));
    }
}
