//! The api's HTTP listeners and their limits: how long a client may take to send a request's
//! headers (or sit idle between requests), how many connections one replica holds, and how
//! many requests it works on at once.
//!
//! `axum::serve` sets none of these (hyper's header-read timeout needs a timer it does not
//! install), so a slow or idle client held a connection and a task forever, unauthenticated.
//! This is the same hyper-util server axum uses, with a timer, a connection cap and a graceful
//! shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::IntoResponse;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::error::ApiError;

/// What one listener allows each client.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest a client may take to send a request's headers; then the connection is closed.
    pub header_read_timeout: Duration,
    /// Longest a connection may sit with no request in flight (kept alive, or never sending a
    /// first request); then it is closed. Longer than the proxy's own keep-alive, so that the
    /// proxy, not the api, closes a pooled connection.
    pub idle_timeout: Duration,
    /// Connections held at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

/// The body of the answer to a connection over the cap.
const OVER_CAPACITY: &str =
    r#"{"error":{"code":"overloaded","message":"too many connections; retry"}}"#;

/// Serves `router` on `listener` until `stop` is cancelled, then lets open connections finish
/// their requests (the caller bounds how long).
pub async fn serve(listener: TcpListener, router: Router, limits: Limits, stop: CancellationToken) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    // HTTP/2 (prior knowledge) has no header timeout; a ping that goes unanswered for as long
    // closes a dead or stalled peer instead.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let tasks = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors, mostly: wait rather than spin.
                    tracing::warn!(error = %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                max_connections = limits.max_connections,
                "connection refused: API_MAX_CONNECTIONS reached"
            );
            tokio::spawn(refuse(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(serve_connection(
            builder.clone(),
            stream,
            router.clone(),
            limits.idle_timeout,
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// One connection, until the client closes it, it idles for `idle_timeout`, or `stop`: then
/// the request in flight, if any, is finished and the connection closed.
async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    router: Router,
    idle_timeout: Duration,
    stop: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let router = router.clone();
            let busy = activity.begin();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        })
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                // A client that goes away or times out is its own business, not an error of ours.
                if let Err(error) = result {
                    tracing::debug!(error = %error, "connection closed with an error");
                }
                break;
            }
            () = stop.cancelled(), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = activity.idle_for(idle_timeout), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    last_done: Mutex<Instant>,
}

/// A request in flight; its end is the connection's last activity.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.last_done.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_done: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let idle = self
                .last_done
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .elapsed();
            if self.in_flight.load(Ordering::SeqCst) == 0 && idle >= timeout {
                return;
            }
            let wait = timeout.saturating_sub(idle).max(Duration::from_millis(50));
            tokio::time::sleep(wait).await;
        }
    }
}

/// Answers a connection over the cap with a 503, written before anything is read, and closes
/// it: the client learns why and may retry on another replica.
async fn refuse(mut stream: TcpStream) {
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-type: application/json\r\n\
         connection: close\r\ncontent-length: {}\r\n\r\n{OVER_CAPACITY}",
        OVER_CAPACITY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    })
    .await;
}

/// Paths that bypass the concurrency limit: the probes, so that a replica saturated by reads
/// is not also restarted by its liveness probe.
fn is_probe(path: &str) -> bool {
    matches!(path, "/health" | "/health/ready" | "/health/live")
}

/// Answers 503 `overloaded` at once to a request beyond `max_requests` in flight, rather than
/// queueing it behind the others (tower's `ConcurrencyLimit` queues, and `LoadShed` cannot let
/// the probes through without a router of their own).
pub fn limit_concurrency(router: Router, max_requests: usize) -> Router {
    let permits = Arc::new(Semaphore::new(max_requests));
    router.layer(middleware::from_fn(move |request: Request, next: Next| {
        let permits = permits.clone();
        async move {
            if is_probe(request.uri().path()) {
                return next.run(request).await;
            }
            match permits.try_acquire_owned() {
                Ok(_permit) => next.run(request).await,
                Err(_) => ApiError::Overloaded.into_response(),
            }
        }
    }))
}

/// The routes only the admin listener serves when `API_ADMIN_LISTEN_ADDR` is set: the metrics,
/// and the detailed health that asks Postgres and Redis.
const ADMIN_PATHS: [&str; 2] = ["/metrics", "/health/detailed"];

/// `router` without the admin routes (404, like any unknown path).
pub fn without_admin_routes(router: Router) -> Router {
    router.layer(middleware::from_fn(
        |request: Request, next: Next| async move {
            if ADMIN_PATHS.contains(&request.uri().path()) {
                return ApiError::NotFound("route").into_response();
            }
            next.run(request).await
        },
    ))
}

/// `router` with only the admin routes and the liveness probe.
pub fn only_admin_routes(router: Router) -> Router {
    router.layer(middleware::from_fn(
        |request: Request, next: Next| async move {
            let path = request.uri().path();
            if ADMIN_PATHS.contains(&path) || path == "/health" {
                next.run(request).await
            } else {
                ApiError::NotFound("route").into_response()
            }
        },
    ))
}

/// Serves the admin router on its own listener, with its own (small) connection cap.
pub async fn serve_admin(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    serve(listener, only_admin_routes(router), limits, stop).await;
}
