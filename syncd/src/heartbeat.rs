//! The fleet status syncd publishes for the api's `/health/detailed`: a heartbeat per replica
//! and the token's state, in one Redis hash.

use std::time::Duration;

use chrono::Utc;
use fred::prelude::*;
use shared::keys::{self, status};
use tokio_util::sync::CancellationToken;

use crate::token::TokenState;

/// How often a replica writes its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(10);
/// Heartbeats older than this are removed from the status hash.
const HEARTBEAT_FORGET: Duration = Duration::from_secs(3600);

/// Writes this replica's heartbeat and the token status every few seconds until `cancel`,
/// then removes the heartbeat.
pub async fn run_heartbeat(
    redis: Client,
    consumer: String,
    token: TokenState,
    cancel: CancellationToken,
) {
    let field = format!("{}{consumer}", status::HEARTBEAT_PREFIX);
    loop {
        let mut fields = token.fields();
        fields.push((field.clone(), Utc::now().timestamp_millis().to_string()));
        let written: Result<(), _> = redis.hset(keys::SYNCD_STATUS, fields).await;
        if let Err(error) = written {
            tracing::debug!(error = %error, "could not write the heartbeat");
        }
        forget_old_heartbeats(&redis).await;
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(HEARTBEAT_EVERY) => {}
            () = token.inner.changed.notified() => {}
        }
    }
    let _: Result<(), _> = redis.hdel(keys::SYNCD_STATUS, field).await;
}

async fn forget_old_heartbeats(redis: &Client) {
    let Ok(all) = redis
        .hgetall::<std::collections::HashMap<String, String>, _>(keys::SYNCD_STATUS)
        .await
    else {
        return;
    };
    let cutoff = Utc::now().timestamp_millis() - HEARTBEAT_FORGET.as_millis() as i64;
    let old: Vec<String> = all
        .into_iter()
        .filter(|(name, value)| {
            name.starts_with(status::HEARTBEAT_PREFIX)
                && value.parse::<i64>().is_ok_and(|ms| ms < cutoff)
        })
        .map(|(name, _)| name)
        .collect();
    if !old.is_empty() {
        let _: Result<(), _> = redis.hdel(keys::SYNCD_STATUS, old).await;
    }
}
