//! `bench read --hostile-searches`: a normal page's latency while 8 clients send worst-case
//! searches, against the same page alone, in one run on a whole deployment (`stack`).
//!
//! A worst-case search is 16 words that the trigram index cannot narrow and the match cache
//! has not seen: words made only of frequent trigrams (each in more than one chat in five, so
//! not indexed), drawn fresh from the seeded texts by a random walk, mixed with two-character
//! words (no trigram at all). Each must be compared with every chat's text. The 8 clients send
//! as one caller, and as 8 callers (one token each); a last row sends them to an api with the
//! bounds turned off (no rate per caller, a 4 GiB scan budget, 8 costly searches at once), the
//! reference the bounds improve on.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::read::{wrk, wrk_script, WrkResult};
use crate::stack::{Stack, JWT_SECRET};

/// The normal page: the default sort, a random offset in the first 10,000 rows.
const PAGE: &str = "\"/chats/all?limit=50&offset=\" .. math.random(0, 9950)";

/// How many distinct frequent-trigram words the hostile clients draw from: more than the
/// match cache holds, so that nearly every word a request sends is compared with every chat.
const HOSTILE_WORDS: usize = 40_000;

/// The Lua of the hostile clients: every request 16 words, 12 from `words` and 4 random
/// two-character ones, each request's token one of `tokens`.
fn hostile_script(tokens: &[String], words: &[String]) -> String {
    let quoted = |items: &mut dyn Iterator<Item = String>| {
        items
            .map(|item| format!("'{item}'"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let tokens = quoted(&mut tokens.iter().map(|token| format!("Bearer {token}")));
    let words = quoted(&mut words.iter().map(|word| percent_encode(word)));
    let mut letters: Vec<String> = ('a'..='z').chain('0'..='9').map(String::from).collect();
    letters.extend(('а'..='я').map(|c| percent_encode(&c.to_string())));
    let letters = quoted(&mut letters.into_iter());
    format!(
        "math.randomseed(7)\n\
         local tokens = {{{tokens}}}\n\
         local words = {{{words}}}\n\
         local letters = {{{letters}}}\n\
         request = function()\n\
           local picked = {{}}\n\
           for i = 1, 12 do picked[i] = words[math.random(#words)] end\n\
           for i = 13, 16 do picked[i] = letters[math.random(#letters)] .. letters[math.random(#letters)] end\n\
           local path = '/chats/all?limit=50&search=' .. table.concat(picked, '%20')\n\
           return wrk.format('GET', path, {{Authorization = tokens[math.random(#tokens)]}})\n\
         end\n"
    )
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Up to `n` distinct words of letters and digits whose every byte trigram occurs in more than
/// one chat in five of the seeded texts (lowered as the api lowers them), so the api's trigram
/// index holds none of them: a random walk over the texts' characters that takes only steps
/// keeping every trigram frequent.
async fn frequent_trigram_words(db: &sqlx::PgPool, n: usize) -> anyhow::Result<Vec<String>> {
    let texts: Vec<String> = sqlx::query_scalar(
        "select lower(coalesce(name, '') || ' ' || coalesce(department, '') || ' ' \
         || coalesce(max_chat_id, '') || ' ' || coalesce(source, '')) from chats",
    )
    .fetch_all(db)
    .await?;
    let mut frequency: HashMap<[u8; 3], usize> = HashMap::new();
    let mut alphabet: HashSet<char> = HashSet::new();
    for text in &texts {
        let mut grams: Vec<[u8; 3]> = text
            .as_bytes()
            .windows(3)
            .map(|w| [w[0], w[1], w[2]])
            .collect();
        grams.sort_unstable();
        grams.dedup();
        for gram in grams {
            *frequency.entry(gram).or_default() += 1;
        }
        alphabet.extend(text.chars().filter(|c| c.is_alphanumeric()));
    }
    let limit = (texts.len() / 5).max(64);
    let frequent = |word: &str| {
        word.as_bytes().windows(3).all(|w| {
            frequency
                .get(&[w[0], w[1], w[2]])
                .is_some_and(|f| *f > limit)
        })
    };
    let mut alphabet: Vec<char> = alphabet.into_iter().collect();
    alphabet.sort_unstable();
    let mut random = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut words = HashSet::new();
    for _ in 0..n * 50 {
        if words.len() >= n {
            break;
        }
        let mut word = String::new();
        let length = 2 + random.below(9);
        for _ in 0..length {
            let start = random.below(alphabet.len());
            let next = (0..alphabet.len())
                .map(|i| alphabet[(start + i) % alphabet.len()])
                .find(|c| frequent(&format!("{word}{c}")));
            match next {
                Some(c) => word.push(c),
                None => break,
            }
        }
        if word.len() >= 3 {
            words.insert(word);
        }
    }
    let mut words: Vec<String> = words.into_iter().collect();
    words.sort_unstable();
    Ok(words)
}

/// A small deterministic generator: the words are the same in every run on the same data.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
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
    words: &[String],
    seconds: u64,
    connections: u32,
) -> anyhow::Result<(WrkResult, WrkResult)> {
    let script = stack.dir.join("hostile.lua");
    std::fs::write(&script, hostile_script(tokens, words))?;
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
    let words = frequent_trigram_words(&stack.db, HOSTILE_WORDS).await?;
    eprintln!(
        "bench read --hostile-searches: {} words of frequent trigrams, e.g. {:?}",
        words.len(),
        words
            .iter()
            .step_by((words.len() / 5).max(1))
            .collect::<Vec<_>>()
    );
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
    let (one, one_hostile) =
        page_under_searches(&stack, port, &one_caller, &words, seconds, connections)?;
    eprintln!("bench read --hostile-searches: page with 8 clients, 8 callers");
    let (eight, eight_hostile) =
        page_under_searches(&stack, port, &eight_callers, &words, seconds, connections)?;
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
    let (open_eight, open_hostile) = page_under_searches(
        &stack,
        open_port,
        &eight_callers,
        &words,
        seconds,
        connections,
    )?;
    open.kill();

    let met = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "\nHostile searches: {chats} chats; the page is GET /chats/all?limit=50 at offsets 0..10000, wrk -t2 -c{connections} -d{seconds}s; \
         8 hostile clients (wrk -t2 -c8) send 12 uncached words of frequent trigrams and 4 two-character words per request; same run\n"
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
