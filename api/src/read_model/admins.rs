//! A chat's administrators packed into one allocation (none when it has none): at 150,000
//! chats with two or three each, a `Vec` of records with their strings would cost five or
//! more allocations per chat; packed, they cost one of about 50 bytes an administrator.
//!
//! Layout, per administrator, little-endian: `id: i32`, `flags: u8`, `created_at: i64`,
//! `updated_at: i64` (microseconds, `Micros`), `phone_len: u32`, `max_id_len: u32`, then the
//! phone's and the max id's bytes.

use super::postgres::AdministratorRecord;
use super::Micros;

const ADD_USER: u8 = 1;
const ADD_USER_NULL: u8 = 1 << 1;
const ADD_ADMIN: u8 = 1 << 2;
const ADD_ADMIN_NULL: u8 = 1 << 3;
const MAX_ID_NULL: u8 = 1 << 4;

/// Bytes of an administrator before its texts.
const HEAD: usize = 4 + 1 + 8 + 8 + 4 + 4;

#[derive(Default)]
pub(super) struct Admins(Box<[u8]>);

fn flag(value: Option<bool>, set: u8, null: u8) -> u8 {
    match value {
        Some(true) => set,
        Some(false) => 0,
        None => null,
    }
}

fn unflag(flags: u8, set: u8, null: u8) -> Option<bool> {
    (flags & null == 0).then_some(flags & set != 0)
}

fn len32(text: &str) -> [u8; 4] {
    u32::try_from(text.len())
        .expect("an administrator's text fits in 4 GiB")
        .to_le_bytes()
}

impl Admins {
    pub(super) fn pack(records: &[AdministratorRecord]) -> Self {
        if records.is_empty() {
            return Self::default();
        }
        let size = records
            .iter()
            .map(|a| HEAD + a.phone.len() + a.max_id.as_deref().map_or(0, str::len))
            .sum();
        let mut bytes = Vec::with_capacity(size);
        for a in records {
            let max_id = a.max_id.as_deref();
            let flags = flag(a.add_user, ADD_USER, ADD_USER_NULL)
                | flag(a.add_admin, ADD_ADMIN, ADD_ADMIN_NULL)
                | if max_id.is_none() { MAX_ID_NULL } else { 0 };
            bytes.extend_from_slice(&a.id.to_le_bytes());
            bytes.push(flags);
            bytes.extend_from_slice(&Micros::from(a.created_at).0.to_le_bytes());
            bytes.extend_from_slice(&Micros::from(a.updated_at).0.to_le_bytes());
            bytes.extend_from_slice(&len32(&a.phone));
            bytes.extend_from_slice(&len32(max_id.unwrap_or_default()));
            bytes.extend_from_slice(a.phone.as_bytes());
            bytes.extend_from_slice(max_id.unwrap_or_default().as_bytes());
        }
        Self(bytes.into_boxed_slice())
    }

    /// Bytes held.
    pub(super) fn size(&self) -> usize {
        self.0.len()
    }

    pub(super) fn unpack(&self) -> Vec<AdministratorRecord> {
        let mut out = Vec::new();
        let mut rest: &[u8] = &self.0;
        while !rest.is_empty() {
            let (head, tail) = rest.split_at(HEAD);
            let i32_at = |at: usize| i32::from_le_bytes(head[at..at + 4].try_into().unwrap());
            let u32_at = |at: usize| u32::from_le_bytes(head[at..at + 4].try_into().unwrap());
            let i64_at = |at: usize| i64::from_le_bytes(head[at..at + 8].try_into().unwrap());
            let flags = head[4];
            let phone_len = u32_at(21) as usize;
            let max_id_len = u32_at(25) as usize;
            let (phone, tail) = tail.split_at(phone_len);
            let (max_id, tail) = tail.split_at(max_id_len);
            // Packed from `&str`s, so each slice is whole UTF-8.
            let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
            out.push(AdministratorRecord {
                id: i32_at(0),
                phone: text(phone),
                max_id: (flags & MAX_ID_NULL == 0).then(|| text(max_id)),
                add_user: unflag(flags, ADD_USER, ADD_USER_NULL),
                add_admin: unflag(flags, ADD_ADMIN, ADD_ADMIN_NULL),
                created_at: Micros(i64_at(5)).get(),
                updated_at: Micros(i64_at(13)).get(),
            });
            rest = tail;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DateTime, TimeZone, Utc};

    use super::*;

    #[test]
    fn administrators_unpack_as_they_were_packed() {
        let at = Utc.timestamp_opt(1_700_000_000, 123_456_000).unwrap();
        // The far ends as microseconds hold them (`infinity` loads as the largest instant).
        let last = DateTime::from_timestamp_micros(DateTime::<Utc>::MAX_UTC.timestamp_micros());
        let records = vec![
            AdministratorRecord {
                id: 7,
                phone: "+79990001122".into(),
                max_id: Some("ёж 42".into()),
                add_user: Some(true),
                add_admin: Some(false),
                created_at: Some(at),
                updated_at: last,
            },
            AdministratorRecord {
                id: -3,
                phone: String::new(),
                max_id: None,
                add_user: None,
                add_admin: Some(true),
                created_at: None,
                updated_at: Some(DateTime::<Utc>::MIN_UTC),
            },
            AdministratorRecord {
                id: 9,
                phone: "8 800".into(),
                max_id: Some(String::new()),
                add_user: Some(false),
                add_admin: None,
                created_at: Some(at),
                updated_at: Some(at),
            },
        ];
        let packed = Admins::pack(&records);
        assert_eq!(packed.unpack(), records);
        assert_eq!(packed.size(), 3 * HEAD + 12 + 7 + 5);
        assert_eq!(Admins::pack(&[]).size(), 0);
        assert!(Admins::pack(&[]).unpack().is_empty());
    }
}
