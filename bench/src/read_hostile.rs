//! `bench read --hostile-searches`: a normal page's latency while 8 clients send worst-case
//! searches, against the same page alone, in one run on a whole deployment (`stack`).
//!
//! A worst-case search is 16 two-character words picked at random from Latin and Cyrillic
//! letters and digits: no word has a trigram, so each must be compared with every chat's text,
//! and a new word is seldom in the cache. The 8 clients send as one caller, and as 8 callers
//! (one token each); a last row sends them to an api with the bounds turned off (no rate per
//! caller, a 4 GiB scan budget, 8 costly searches at once), the reference the bounds improve on.

use std::time::Duration;

use crate::read::{wrk, wrk_script, WrkResult};
use crate::stack::{Stack, JWT_SECRET};

/// The normal page: the default sort, a random offset in the first 10,000 rows.
const PAGE: &str = "\"/chats/all?limit=50&offset=\" .. math.random(0, 9950)";

/// The Lua of the hostile clients: every request 16 random two-character words, each request's
/// token one of `tokens`.
fn hostile_script(tokens: &[String]) -> String {
    let tokens = tokens
        .iter()
        .map(|token| format!("\"Bearer {token}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut letters: Vec<String> = ('a'..='z').chain('0'..='9').map(String::from).collect();
    // Cyrillic letters, percent-encoded as UTF-8.
    letters.extend(('а'..='я').map(|c| {
        c.to_string()
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect::<String>()
    }));
    let letters = letters
        .iter()
        .map(|l| format!("'{l}'"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "math.randomseed(7)\n\
         local tokens = {{{tokens}}}\n\
         local letters = {{{letters}}}\n\
         request = function()\n\
           local words = {{}}\n\
           for i = 1, 16 do words[i] = letters[math.random(#letters)] .. letters[math.random(#letters)] end\n\
           local path = '/chats/all?limit=50&search=' .. table.concat(words, '%20')\n\
           return wrk.format('GET', path, {{Authorization = tokens[math.random(#tokens)]}})\n\
         end\n"
    )
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
    let script = stack.dir.join("hostile.lua");
    std::fs::write(&script, hostile_script(tokens))?;
    // The hostile clients start first and end last, so they cover the whole page run.
    let hostile = std::thread::spawn(move || wrk_script(port, &script, seconds + 2, 8));
    std::thread::sleep(Duration::from_secs(1));
    let page = wrk(port, PAGE, &stack.token, seconds, connections, &stack.dir)?;
    let hostile = hostile
        .join()
        .map_err(|_| anyhow::anyhow!("the hostile wrk thread panicked"))??;
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
    eprintln!("bench read --hostile-searches: page with 8 clients, 8 callers");
    let (eight, eight_hostile) =
        page_under_searches(&stack, port, &eight_callers, seconds, connections)?;
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
    open.kill();

    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "\nHostile searches: {chats} chats; the page is GET /chats/all?limit=50 at offsets 0..10000, wrk -t2 -c{connections} -d{seconds}s; \
         8 hostile clients (wrk -t2 -c8) send 16 random two-character words per request; same run\n"
    );
    println!("| what | page rps | page p50 | page p99 | p99 / alone | hostile requests (non-2xx) | target | result |");
    println!("|---|---|---|---|---|---|---|---|");
    let row = |label: &str,
               page: &WrkResult,
               base: &WrkResult,
               hostile: Option<&WrkResult>,
               target: bool| {
        let ratio = page.p99_ms / base.p99_ms;
        println!(
            "| {label} | {:.0} | {:.2} ms | {:.2} ms | {ratio:.2}x | {} | {} | {} |",
            page.rps,
            page.p50_ms,
            page.p99_ms,
            hostile.map_or("-".to_owned(), |h| format!(
                "{} ({})",
                h.requests, h.non_2xx
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
        Some(&one_hostile),
        true,
    );
    row(
        "page, 8 hostile clients as 8 callers",
        &eight,
        &alone,
        Some(&eight_hostile),
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
        Some(&open_hostile),
        false,
    );
    Ok(())
}
