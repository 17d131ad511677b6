//! The sync task under supervision: a panic (a bug, a row nobody foresaw) or an unexpected end
//! must not leave the model frozen while the api goes on answering. The task is restarted with
//! backoff, each restart counted (`participants_read_model_sync_restarts_total`) and logged
//! once per streak; meanwhile the model keeps serving and its age keeps growing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{follow, SyncSettings};
use crate::metrics::Metrics;
use crate::read_model::ReadModel;

const RESTART_MIN: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

/// Keeps `model` current until `cancel` fires. Returns an error only when the database cannot
/// serve the read model at all (a standby, notifications lost) before the first load: the
/// api then stops with it.
pub async fn run(
    model: Arc<ReadModel>,
    settings: SyncSettings,
    metrics: Metrics,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    supervise(
        || {
            follow(
                model.clone(),
                settings.clone(),
                metrics.clone(),
                cancel.clone(),
            )
        },
        &model,
        &metrics,
        &cancel,
    )
    .await
}

/// Runs the task `start` makes, and again after it panics or ends before `cancel`.
async fn supervise<F>(
    mut start: impl FnMut() -> F,
    model: &ReadModel,
    metrics: &Metrics,
    cancel: &CancellationToken,
) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut backoff = RESTART_MIN;
    let mut restarted_at: Option<Instant> = None;
    loop {
        let ended = tokio::spawn(start()).await;
        if cancel.is_cancelled() {
            return Ok(());
        }
        let why = match ended {
            Ok(Err(unusable)) => return Err(unusable),
            Ok(Ok(())) => "the read model's sync task ended".to_owned(),
            Err(error) if error.is_panic() => {
                let panic = error.into_panic();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-text panic".to_owned());
                format!("the read model's sync task panicked: {message}")
            }
            Err(_) => "the read model's sync task was cancelled".to_owned(),
        };
        metrics.read_model_sync_restarts.inc();
        // A streak ends when the restarted task got the model in step again.
        let recovered =
            restarted_at.is_none_or(|at| model.age().is_some_and(|age| age < at.elapsed()));
        if recovered {
            backoff = RESTART_MIN;
            tracing::error!(
                error = why,
                restart_in_s = backoff.as_secs(),
                loaded = model.is_loaded(),
                "read model sync failed; restarting it with backoff (logged once until it recovers)"
            );
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            () = tokio::time::sleep(backoff) => {}
        }
        restarted_at = Some(Instant::now());
        backoff = (backoff * 2).min(RESTART_MAX);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_is_restarted_and_counted_until_cancelled() {
        let model = ReadModel::new();
        let metrics = Metrics::new();
        let cancel = CancellationToken::new();
        let starts = Arc::new(AtomicU32::new(0));
        let supervised = {
            let starts = starts.clone();
            let cancel = cancel.clone();
            move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let cancel = cancel.clone();
                async move {
                    match n {
                        0 => panic!("a row nobody foresaw"),
                        1 => Ok(()),
                        _ => {
                            cancel.cancelled().await;
                            Ok(())
                        }
                    }
                }
            }
        };
        let run = tokio::spawn({
            let (model, metrics, cancel) = (model.clone(), metrics.clone(), cancel.clone());
            async move { supervise(supervised, &model, &metrics, &cancel).await }
        });
        while starts.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(metrics.read_model_sync_restarts.get(), 2);
        cancel.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_unusable_database_stops_the_supervisor() {
        let model = ReadModel::new();
        let metrics = Metrics::new();
        let cancel = CancellationToken::new();
        let result = supervise(
            || async { Err(anyhow::anyhow!("DATABASE_URL points at a hot standby")) },
            &model,
            &metrics,
            &cancel,
        )
        .await;
        assert!(result.unwrap_err().to_string().contains("DATABASE_URL"));
        assert_eq!(metrics.read_model_sync_restarts.get(), 0);
    }
}
