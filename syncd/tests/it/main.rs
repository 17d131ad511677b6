//! Integration tests of `syncd` against real Redis and PostgreSQL servers and the workspace's
//! MAX simulator over HTTP.

mod consumer;
mod database;
mod end_to_end;
mod events;
mod healing;
mod helpers;
mod inspect;
mod ops;
mod poll;
mod real_life;
mod scale_out;
mod schedules;
mod subscribe;
mod sweeps;
mod tls;
mod tracing;
