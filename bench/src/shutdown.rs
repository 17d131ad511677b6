//! `bench shutdown`: SIGTERM to a busy `syncd run` (the release binary) in three states of its
//! dependencies, one row each: how long it took to exit against `SYNCD_SHUTDOWN_GRACE` + 1 s,
//! its exit status, and the MAX calls that reached the simulator after the signal (calls sent
//! before it, still on their way, are given 300 ms to arrive).

use std::time::Duration;

use maxsim::SimConfig;
use shared::refresh::Priority;

use crate::stack::Stack;

const CHATS: i32 = 400;
const GRACE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug)]
enum State {
    /// MAX answers in 200 ms; a backlog of manual and lazy refreshes is being worked.
    Busy,
    /// Every MAX call answered 503 after 200 ms: retries and the breaker are in play.
    MaxDown,
    /// Redis SIGKILLed mid-batch: the limiter and the streams are unreachable.
    RedisDown,
}

impl State {
    fn title(self) -> &'static str {
        match self {
            State::Busy => "busy: a backlog in the streams, MAX answering in 200 ms",
            State::MaxDown => "MAX down: every call answered 503 after 200 ms",
            State::RedisDown => "Redis SIGKILLed mid-batch",
        }
    }
}

struct Row {
    state: State,
    exited_in: Option<Duration>,
    exit_ok: bool,
    calls_after: u64,
}

pub async fn run() -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for state in [State::Busy, State::MaxDown, State::RedisDown] {
        eprintln!("bench shutdown: {}", state.title());
        rows.push(one(state).await?);
    }
    println!(
        "\nSIGTERM to `syncd run` (SYNCD_SHUTDOWN_GRACE={} s, MAX_API_RPS=30) with {CHATS} manual and {CHATS} lazy refreshes enqueued\n",
        GRACE.as_secs()
    );
    println!(
        "| state | exited after | target | exit status | MAX calls after the signal | result |"
    );
    println!("|---|---|---|---|---|---|");
    for row in rows {
        let met = row
            .exited_in
            .is_some_and(|t| t <= GRACE + Duration::from_secs(1))
            && row.calls_after == 0
            && row.exit_ok;
        println!(
            "| {} | {} | ≤ grace + 1 s, 0 calls after | {} | {} | {} |",
            row.state.title(),
            row.exited_in.map_or_else(
                || "did not exit".to_owned(),
                |t| format!("{:.2} s", t.as_secs_f64())
            ),
            if row.exit_ok { "0" } else { "non-zero" },
            row.calls_after,
            if met { "met" } else { "missed" },
        );
    }
    Ok(())
}

async fn one(state: State) -> anyhow::Result<Row> {
    let mut stack = Stack::start(
        CHATS * 2,
        SimConfig {
            rate_limit: 0,
            latency_ms: 200,
            error_rate: if matches!(state, State::MaxDown) {
                1.0
            } else {
                0.0
            },
            ..SimConfig::default()
        },
        &[],
    )
    .await?;
    let mut syncd = stack
        .syncd(&[
            ("MAX_API_RPS", "30"),
            ("PARTICIPANTS_ENABLE_BACKGROUND_SYNC", "false"),
            ("SYNCD_SHUTDOWN_GRACE", "20s"),
        ])
        .await?;
    let redis = stack.redis_client().await?;
    let ids: Vec<i32> = (1..=CHATS * 2).collect();
    let (manual, lazy) = ids.split_at(CHATS as usize);
    shared::refresh::enqueue(
        &redis,
        Priority::Manual,
        manual,
        Duration::from_secs(600),
        None,
    )
    .await?;
    shared::refresh::enqueue(&redis, Priority::Lazy, lazy, Duration::from_secs(600), None).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    if matches!(state, State::RedisDown) {
        stack.redis.kill();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let sim = stack.sim.clone();
    let (exited_in, exit_ok, calls_after) = tokio::task::spawn_blocking(move || {
        let signalled = std::time::Instant::now();
        let mut at_signal = None;
        let watcher = std::thread::spawn({
            let sim = sim.clone();
            move || {
                std::thread::sleep(Duration::from_millis(300));
                sim.stats().requests
            }
        });
        let (exited_in, exit_ok) = syncd.terminate(GRACE + Duration::from_secs(10));
        if let Ok(requests) = watcher.join() {
            at_signal = Some(requests);
        }
        std::thread::sleep(
            Duration::from_millis(300).saturating_sub(signalled.elapsed())
                + Duration::from_millis(500),
        );
        let after = sim.stats().requests;
        (
            exited_in,
            exit_ok,
            after.saturating_sub(at_signal.unwrap_or(after)),
        )
    })
    .await?;
    Ok(Row {
        state,
        exited_in,
        exit_ok,
        calls_after,
    })
}
