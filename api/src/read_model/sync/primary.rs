//! The check a session makes before it trusts its connection: the read model follows changes
//! by LISTEN/NOTIFY, which needs a session of its own on the primary. A hot standby refuses
//! LISTEN (the model would never load), and a pooler in transaction mode (PgBouncer) passes
//! LISTEN to whichever server connection is free and loses the notifications silently.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgListener;
use sqlx::PgPool;

use super::{within, PING_DEADLINE};
use crate::read_model::postgres;

/// How long the session waits for its own probe notification to come back.
const PROBE_WAIT: Duration = Duration::from_secs(10);

/// Why `DATABASE_URL` cannot serve the read model. Before the first load this stops the api.
#[derive(Debug, thiserror::Error)]
pub enum Unusable {
    #[error(
        "DATABASE_URL points at a hot standby (pg_is_in_recovery() is true): the api needs a \
         direct session to the primary, where LISTEN/NOTIFY works"
    )]
    Standby,
    #[error(
        "a notification sent on DATABASE_URL did not come back to the listening connection within \
         {} s: the api needs a direct session to the primary (LISTEN/NOTIFY); a pooler in \
         transaction mode, such as PgBouncer's, loses notifications", PROBE_WAIT.as_secs()
    )]
    NotificationsLost,
}

/// Fails with `Unusable` when the server is a standby or a notification does not come back
/// to `listener`. The probe is sent from another connection of `pool` on a channel of its
/// own, so other replicas never see it.
pub(super) async fn check(listener: &mut PgListener, pool: &PgPool) -> anyhow::Result<()> {
    let standby = within(PING_DEADLINE, "checking for a standby", async {
        postgres::is_standby(&mut *listener)
            .await
            .context("cannot ask whether postgres is a standby")
    })
    .await?;
    if standby {
        return Err(Unusable::Standby.into());
    }
    let payload = uuid::Uuid::new_v4().to_string();
    within(PING_DEADLINE, "probing notifications", async {
        listener
            .listen(postgres::PROBE_CHANNEL)
            .await
            .context("cannot listen for the probe")?;
        postgres::notify_probe(pool, &payload)
            .await
            .context("cannot send the probe notification")
    })
    .await?;
    let heard = tokio::time::timeout(PROBE_WAIT, async {
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.channel() == postgres::PROBE_CHANNEL && n.payload() == payload => {
                    return Ok(());
                }
                Ok(Some(_)) => {}
                Ok(None) => anyhow::bail!("notification connection lost"),
                Err(error) => return Err(error).context("notification connection failed"),
            }
        }
    })
    .await;
    match heard {
        Ok(result) => result?,
        Err(_) => return Err(Unusable::NotificationsLost.into()),
    }
    within(PING_DEADLINE, "ending the probe", async {
        listener
            .unlisten(postgres::PROBE_CHANNEL)
            .await
            .context("cannot stop listening for the probe")
    })
    .await
}
