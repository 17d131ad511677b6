//! `bench read --hostile-searches`: a normal page's latency while 8 clients send worst-case
//! searches, against the same page alone, in one run on a whole deployment (`stack`).
//!
//! A worst-case search makes the api compare every word with every chat's text: 16 words that
//! the trigram index cannot narrow (shorter than three bytes, or made only of trigrams nearly
//! every chat has, such as runs of zeros: every MAX id holds `000`) and that each match most
//! chats, so no word's matches cut the others' work short (a word that matches nothing, once
//! known, makes the whole search free). The match cache would soon hold every such word; but
//! any change to a chat's searched text empties it, so, as in a deployment where chats are
//! edited and added, a writer changes one chat's department every 100 ms while the hostile
//! clients run. The 8 clients send as one caller, and as 8 callers (one token each); a last
//! row sends them to an api with the bounds turned off (no rate per caller, a 4 GiB scan
//! budget, 8 costly searches at once), the reference the bounds improve on. Each row also
//! reports what the api's bounds did with the costly searches
//! (`participants_costly_searches_total`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::read::{wrk, wrk_script, WrkResult};
use crate::stack::{Stack, JWT_SECRET};

/// The normal page: the default sort, a random offset in the first 10,000 rows.
const PAGE: &str = "\"/chats/all?limit=50&offset=\" .. math.random(0, 9950)";

/// Words of the bench's chats (`chat <n>`, `admin_panel`, `-700000000<n>`) that the trigram
/// index cannot narrow and that match most chats.
const BROAD_WORDS: &[&str] = &[
    "0", "00", "000", "0000", "00000", "000000", "0000000", "00000000", "7", "70", "700", "c", "h",
    "a", "t", "ch", "ha", "at", "ad", "dm", "mi", "in", "pa", "an", "ne", "el", "chat", "admin",
    "panel",
];

/// The Lua of the hostile clients: every request 16 words drawn from `BROAD_WORDS`, each
/// request's token one of `tokens`.
fn hostile_script(tokens: &[String]) -> String {
    let quoted = |items: Vec<String>| items.join(", ");
    let tokens = quoted(tokens.iter().map(|t| format!("\"Bearer {t}\"")).collect());
    let words = quoted(BROAD_WORDS.iter().map(|w| format!("'{w}'")).collect());
    format!(
        "math.randomseed(7)\n\
         local tokens = {{{tokens}}}\n\
         local broad = {{{words}}}\n\
         request = function()\n\
           local words = {{}}\n\
           for i = 1, 16 do words[i] = broad[math.random(#broad)] end\n\
           local path = '/chats/all?limit=50&search=' .. table.concat(words, '%20')\n\
           return wrk.format('GET', path, {{Authorization = tokens[math.random(#tokens)]}})\n\
         end\n"
    )
}

/// The api's costly searches so far, by outcome: served, rate_limited, over_budget.
async fn costly_searches(stack: &Stack, port: u16) -> [u64; 3] {
    let text = match stack
        .http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
    {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    ["served", "rate_limited", "over_budget"].map(|outcome| {
        let prefix = format!("participants_costly_searches_total{{outcome=\"{outcome}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    })
}

fn token(sub: &str) -> anyhow::Result<String> {
    Ok(api::auth::sign(
        &secrecy::SecretString::from(JWT_SECRET.to_owned()),
        &api::auth::Claims {
            sub: sub.into(),
            role: "super_admin".into(),
            exp: chrono::Utc::now().timestamp() + 24 * 3600,
            university_id: None,
            branch_id: None,
            faculty_id: None,
        },
    )?)
}

/// The page's wrk while the hostile clients run their own wrk beside it.
fn page_under_searches(
    stack: &Stack,
    port: u16,
    tokens: &[String],
    seconds: u64,
    connections: u32,
) -> anyhow::Result<(WrkResult, WrkResult)> {
    // The legacy writer: one chat's department changed every 100 ms, which empties the match
    // cache as any edit of a searched text does.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (db, stop) = (stack.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut round = 0i32;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let _ = sqlx::query(
                    "update chats set department = 'edit ' || $1 where id = 1 + $1 % 1000",
                )
                .bind(round)
                .execute(&db)
                .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let script = stack.dir.join("hostile.lua");
    std::fs::write(&script, hostile_script(tokens))?;
    // The hostile clients start first and end last, so they cover the whole page run.
    let hostile = std::thread::spawn(move || wrk_script(port, &script, seconds + 2, 8));
    std::thread::sleep(Duration::from_secs(1));
    let page = wrk(port, PAGE, &stack.token, seconds, connections, &stack.dir)?;
    let hostile = hostile
        .join()
        .map_err(|_| anyhow::anyhow!("the hostile wrk thread panicked"))??;
    stop.store(true, Ordering::Relaxed);
    writer.abort();
    Ok((page, hostile))
}

pub async fn run(chats: i32, seconds: u64, connections: u32) -> anyhow::Result<()> {
    eprintln!("bench read --hostile-searches: {chats} chats");
    let mut stack = Stack::start(chats, maxsim::SimConfig::default(), &[]).await?;
    let one_caller = vec![token("hostile")?];
    let eight_callers = (0..8)
        .map(|i| token(&format!("hostile-{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut api = stack.api(&[]).await?;
    let port = api.port;
    // Warm up: the page path and the allocator.
    wrk(port, PAGE, &stack.token, 2, connections, &stack.dir)?;
    eprintln!("bench read --hostile-searches: page alone");
    let alone = wrk(port, PAGE, &stack.token, seconds, connections, &stack.dir)?;
    eprintln!("bench read --hostile-searches: page with 8 clients, one caller");
    let (one, one_hostile) = page_under_searches(&stack, port, &one_caller, seconds, connections)?;
    let one_costly = costly_searches(&stack, port).await;
    eprintln!("bench read --hostile-searches: page with 8 clients, 8 callers");
    let (eight, eight_hostile) =
        page_under_searches(&stack, port, &eight_callers, seconds, connections)?;
    let both_costly = costly_searches(&stack, port).await;
    let eight_costly = [0, 1, 2].map(|i| both_costly[i] - one_costly[i]);
    api.kill();

    let mut open = stack
        .api(&[
            ("API_COSTLY_SEARCHES_PER_USER_PER_MINUTE", "0"),
            ("API_SEARCH_SCAN_BUDGET_MB", "4096"),
            ("API_COSTLY_SEARCH_CONCURRENCY", "8"),
        ])
        .await?;
    let open_port = open.port;
    wrk(open_port, PAGE, &stack.token, 2, connections, &stack.dir)?;
    eprintln!("bench read --hostile-searches: bounds off, page alone");
    let open_alone = wrk(
        open_port,
        PAGE,
        &stack.token,
        seconds,
        connections,
        &stack.dir,
    )?;
    eprintln!("bench read --hostile-searches: bounds off, page with 8 clients, 8 callers");
    let (open_eight, open_hostile) =
        page_under_searches(&stack, open_port, &eight_callers, seconds, connections)?;
    let open_costly = costly_searches(&stack, open_port).await;
    open.kill();

    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "\nHostile searches: {chats} chats; the page is GET /chats/all?limit=50 at offsets 0..10000, wrk -t2 -c{connections} -d{seconds}s; \
         8 hostile clients (wrk -t2 -c8) send 16 broad words that the index cannot narrow per request while one chat is edited every 100 ms; same run\n"
    );
    println!("| what | page rps | page p50 | page p99 | p99 / alone | hostile requests (non-2xx) | costly searches: served / 429 / 422 | target | result |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let row = |label: &str,
               page: &WrkResult,
               base: &WrkResult,
               hostile: Option<(&WrkResult, [u64; 3])>,
               target: bool| {
        let ratio = page.p99_ms / base.p99_ms;
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {ratio:.2}x | {} | {} | {} | {} |",
            page.rps,
            page.p50_ms,
            page.p99_ms,
            hostile.map_or("-".to_owned(), |(h, _)| format!(
                "{} ({})",
                h.requests, h.non_2xx
            )),
            hostile.map_or("-".to_owned(), |(_, [served, limited, over])| format!(
                "{served} / {limited} / {over}"
            )),
            if target { "p99 ≤2x alone" } else { "-" },
            if target {
                met(ratio <= 2.0 && page.non_2xx == 0)
            } else {
                "-"
            },
        );
    };
    row("page alone (baseline)", &alone, &alone, None, false);
    row(
        "page, 8 hostile clients as one caller",
        &one,
        &alone,
        Some((&one_hostile, one_costly)),
        true,
    );
    row(
        "page, 8 hostile clients as 8 callers",
        &eight,
        &alone,
        Some((&eight_hostile, eight_costly)),
        true,
    );
    row(
        "bounds off: page alone",
        &open_alone,
        &open_alone,
        None,
        false,
    );
    row(
        "bounds off: page, 8 hostile clients as 8 callers",
        &open_eight,
        &open_alone,
        Some((&open_hostile, open_costly)),
        false,
    );
    Ok(())
}
