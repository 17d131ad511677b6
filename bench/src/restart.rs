//! `bench restart`: reads across an api restart at N chats. A client that does not wait for
//! readiness (a plain load balancer, compose) asks for pages as soon as the new process
//! answers `/health`, while its read model is still loading: every read must be answered
//! (SPEC §3: it waits for the load), and the worst wait is the figure. The baseline is the same
//! clients against the same api before the restart, in the same run.

use std::time::{Duration, Instant};

use maxsim::SimConfig;

use crate::stack::{ms, percentile, Process, Stack};

/// Clients reading pages at once, each as fast as it is answered.
const CLIENTS: usize = 2;
const WINDOW: Duration = Duration::from_secs(5);

struct Reads {
    latencies: Vec<Duration>,
    refused: usize,
}

/// Pages from `CLIENTS` clients for `WINDOW`.
async fn read_pages(stack: &Stack, base: &str) -> Reads {
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let http = stack.http.clone();
            let token = stack.token.clone();
            let base = base.to_owned();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut refused = 0;
                let mut offset = client * 997;
                while started.elapsed() < WINDOW {
                    let asked = Instant::now();
                    let url = format!("{base}/chats/all?limit=50&offset={offset}");
                    let ok = match http.get(url).bearer_auth(&token).send().await {
                        Ok(response) => response.status().is_success(),
                        Err(_) => false,
                    };
                    latencies.push(asked.elapsed());
                    refused += usize::from(!ok);
                    offset = (offset + 50) % 100_000;
                }
                (latencies, refused)
            })
        })
        .collect();
    let mut reads = Reads {
        latencies: Vec::new(),
        refused: 0,
    };
    for client in clients {
        let (latencies, refused) = client.await.expect("a client does not panic");
        reads.latencies.extend(latencies);
        reads.refused += refused;
    }
    reads.latencies.sort_unstable();
    reads
}

async fn wait_for_health(stack: &Stack, process: &Process) -> anyhow::Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let answered = stack
            .http
            .get(format!("{}/health", process.base()))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if answered {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!(
        "the api did not answer /health; see {}",
        process.log.display()
    )
}

pub async fn run(chats: i32) -> anyhow::Result<()> {
    let mut stack = Stack::start(0, SimConfig::default(), &[]).await?;
    crate::read::insert_in_bulk(
        &stack.db,
        "insert into chats (name, url, max_chat_id, participants_count, source) \
         select 'chat ' || g, 'https://max.ru/join/' || g, (-70000000000000 - g)::text, 1, 'admin_panel' \
         from generate_series(1, $1) g",
        chats,
    )
    .await?;
    sqlx::query("vacuum analyze chats")
        .execute(&stack.db)
        .await?;
    eprintln!("bench restart: {chats} chats; steady reads");
    let mut before = stack.api(&[]).await?;
    let steady = read_pages(&stack, &before.base()).await;
    before.terminate(Duration::from_secs(25));
    eprintln!("bench restart: restarted; reads from the moment /health answers");
    let spawned = Instant::now();
    let after = stack.api_unwaited(&[])?;
    wait_for_health(&stack, &after).await?;
    let health_after = spawned.elapsed();
    let restarted = read_pages(&stack, &after.base()).await;

    println!(
        "\nReads across an api restart at {chats} chats: {CLIENTS} clients asking for pages for {} s, \
         the second row from the moment the new process answers /health ({:.2} s after it was started)\n",
        WINDOW.as_secs(),
        health_after.as_secs_f64()
    );
    println!("| phase | reads | refused (not 2xx) | p50 | p99 | worst |");
    println!("|---|---|---|---|---|---|");
    for (phase, reads) in [
        ("steady, before the restart (baseline)", &steady),
        ("right after the restart, during the first load", &restarted),
    ] {
        println!(
            "| {phase} | {} | {} | {} | {} | {} |",
            reads.latencies.len(),
            reads.refused,
            ms(percentile(&reads.latencies, 50.0)),
            ms(percentile(&reads.latencies, 99.0)),
            ms(reads.latencies.last().copied().unwrap_or_default()),
        );
    }
    Ok(())
}
