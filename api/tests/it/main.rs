//! Integration tests of the `api` binary against real Redis and PostgreSQL servers that each
//! test starts on free ports (see the `testkit` crate).

mod admin;
mod auth;
mod faults;
mod helpers;
mod lazy;
mod legacy_compat;
mod limits;
mod list;
mod logs;
mod meta;
mod migrations;
mod proxy;
mod read_model;
mod read_model_changes;
mod schemathesis;
mod search_bounds;
mod sync;
mod tracking;
