//! Refresh outcomes announced by syncd over pub/sub, fanned out to the requests that wait for
//! them in `POST /chats/{id}/refresh-participants`.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use shared::keys;
use shared::refresh::RefreshOutcome;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// Outcomes buffered per waiting request before it starts missing some.
const CAPACITY: usize = 1024;

#[derive(Clone)]
pub struct RefreshWaiters {
    sender: broadcast::Sender<RefreshOutcome>,
}

impl RefreshWaiters {
    pub fn new() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
        }
    }

    /// Subscribe before enqueueing, so that no outcome can slip past.
    pub fn subscribe(&self) -> broadcast::Receiver<RefreshOutcome> {
        self.sender.subscribe()
    }

    /// Hands an outcome to every waiter.
    pub fn publish(&self, outcome: RefreshOutcome) {
        // No receiver means nobody waits; that is fine.
        let _ = self.sender.send(outcome);
    }

    /// Subscribes to syncd's outcome channel (retrying until Redis answers; the client
    /// re-subscribes by itself after a reconnect) and forwards every outcome until `cancel`.
    pub async fn run_listener(self, subscriber: SubscriberClient, cancel: CancellationToken) {
        let mut messages = subscriber.message_rx();
        loop {
            match subscriber.subscribe(keys::REFRESH_OUTCOMES_CHANNEL).await {
                Ok(()) => break,
                Err(error) => {
                    tracing::debug!(error = %error, "cannot subscribe to refresh outcomes yet");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                message = messages.recv() => match message {
                    Ok(message) => {
                        let Some(text) = message.value.as_str() else { continue };
                        match serde_json::from_str::<RefreshOutcome>(&text) {
                            Ok(outcome) => self.publish(outcome),
                            Err(error) => tracing::warn!(error = %error, "ignoring a malformed refresh outcome"),
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "refresh outcome listener fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                },
            }
        }
        let _ = subscriber.quit().await;
    }
}

impl Default for RefreshWaiters {
    fn default() -> Self {
        Self::new()
    }
}
