//! The webhook subscription: `syncd subscribe` (register it, or `--check` it) and, in webhook
//! mode, the running daemon's periodic check that MAX still lists it (MAX drops a subscription
//! whose endpoint failed for 8 hours, MAX_EVENTS.md §1.3; then every event is lost).
//!
//! Ours is a subscription to the given URL (or, in the daemon and `--check` without `--url`,
//! to any URL ending with `/max/updates`) whose types include the five membership types
//! (`null` types: every type).

use std::time::Duration;

use anyhow::{bail, Context};
use tokio_util::sync::CancellationToken;

use super::webhook::PATH;
use super::MEMBERSHIP_TYPES;
use crate::config::SubscribeArgs;
use crate::metrics::Metrics;
use crate::refresh::limiter::{Limiter, Urgency};
use crate::refresh::max::{MaxClient, Subscription};

/// Whether `subscription` delivers the membership types to `url` (or to any `/max/updates`).
pub fn is_ours(subscription: &Subscription, url: Option<&str>) -> bool {
    let url_matches = match url {
        Some(url) => subscription.url == url,
        None => subscription.url.trim_end_matches('/').ends_with(PATH),
    };
    let types_match = subscription.update_types.as_ref().is_none_or(|types| {
        MEMBERSHIP_TYPES
            .iter()
            .all(|wanted| types.iter().any(|t| t == wanted))
    });
    url_matches && types_match
}

/// Whether `subscription` also delivers types beyond the five membership ones (`null`: every
/// type): message updates then fill the events stream, use up MAX's 100 notifications a second
/// and put message text into Redis.
pub fn delivers_more(subscription: &Subscription) -> bool {
    subscription.update_types.as_ref().is_none_or(|types| {
        types
            .iter()
            .any(|t| !MEMBERSHIP_TYPES.contains(&t.as_str()))
    })
}

/// One line per subscription: its URL, when it was made, its types.
pub fn describe(subscriptions: &[Subscription]) -> String {
    if subscriptions.is_empty() {
        return "no webhook subscription (MAX keeps updates for GET /updates)\n".to_owned();
    }
    let mut text = String::new();
    for s in subscriptions {
        // The schema says "unix" without a unit; the simulator answers ms.
        let ms = if s.time < 100_000_000_000 {
            s.time.saturating_mul(1000)
        } else {
            s.time
        };
        let time = chrono::DateTime::from_timestamp_millis(ms)
            .map_or_else(|| s.time.to_string(), |t| t.to_rfc3339());
        let types = s
            .update_types
            .as_ref()
            .map_or_else(|| "(all types)".to_owned(), |t| t.join(","));
        text.push_str(&format!("{}\t{time}\t{types}\n", s.url));
        if delivers_more(s) {
            text.push_str(&format!(
                "  warning: {} also receives updates other than the membership types (message text reaches Redis); subscribe it again with `syncd subscribe --url … --replace`\n",
                s.url
            ));
        }
    }
    text
}

/// `syncd subscribe`: what to print, and whether ours is subscribed at the end (with
/// `--check`, the exit code says it).
pub async fn command(args: &SubscribeArgs) -> anyhow::Result<(String, bool)> {
    let max = MaxClient::new(
        &args.max_api_url,
        args.max_api_token.clone(),
        args.participants_max_api_timeout,
    )?;
    let listed = max
        .subscriptions()
        .await
        .context("GET /subscriptions failed")?;
    let url = args.url.as_deref();
    if args.check {
        let ours = listed.iter().any(|s| is_ours(s, url));
        let verdict = if ours {
            "ours is subscribed"
        } else {
            "ours is NOT subscribed"
        };
        return Ok((format!("{}{verdict}\n", describe(&listed)), ours));
    }
    let url = url.context("--url is required to subscribe")?;
    let secret = args
        .max_webhook_secret
        .as_ref()
        .context("MAX_WEBHOOK_SECRET is required to subscribe")?;
    let others: Vec<&Subscription> = listed.iter().filter(|s| s.url != url).collect();
    let mut text = String::new();
    if !others.is_empty() {
        let urls: Vec<&str> = others.iter().map(|s| s.url.as_str()).collect();
        if !args.replace {
            bail!(
                "MAX already has a subscription to another URL ({}); nothing changed. Run again with --replace to delete it and subscribe {url}",
                urls.join(", ")
            );
        }
        for other in urls {
            max.unsubscribe(other)
                .await
                .with_context(|| format!("DELETE /subscriptions for {other} failed"))?;
            text.push_str(&format!("deleted the subscription to {other}\n"));
        }
    }
    max.subscribe(url, &MEMBERSHIP_TYPES, secret)
        .await
        .context("POST /subscriptions failed")?;
    let listed = max
        .subscriptions()
        .await
        .context("GET /subscriptions failed")?;
    let ours = listed.iter().any(|s| is_ours(s, Some(url)));
    if !ours {
        bail!(
            "MAX accepted the subscription but does not list it:\n{}",
            describe(&listed)
        );
    }
    text.push_str(&format!(
        "subscribed {url} to {}\n{}",
        MEMBERSHIP_TYPES.join(","),
        describe(&listed)
    ));
    Ok((text, true))
}

/// Webhook mode: checks `GET /subscriptions` every `every` (within the fleet's rate limit) and
/// sets `participants_events_subscription_ok`; a missing subscription is logged as an error
/// once per streak, a failed check as a warning once per streak.
pub async fn watch(
    max: MaxClient,
    limiter: Limiter,
    metrics: Metrics,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut missing = false;
    let mut failing = false;
    let mut too_broad = false;
    while !cancel.is_cancelled() {
        if limiter.acquire(Urgency::Lazy, &cancel).await.is_ok() {
            match max.subscriptions().await {
                Ok(listed) => {
                    failing = false;
                    let ok = listed.iter().any(|s| is_ours(s, None));
                    metrics.events_subscription_ok.set(i64::from(ok));
                    let broad = listed.iter().any(delivers_more);
                    if broad && !too_broad {
                        tracing::warn!(subscriptions = %describe(&listed).trim_end(),
                            "a webhook subscription delivers more than the membership types (logged once until it does not)");
                    }
                    too_broad = broad;
                    if !ok && !missing {
                        let listed = describe(&listed);
                        tracing::error!(subscriptions = %listed.trim_end(),
                            "MAX lists no webhook subscription to /max/updates for the membership types: no membership events arrive. Run `syncd subscribe --url https://<host>/max/updates` (logged once until it is back)");
                    } else if ok && missing {
                        tracing::info!("the webhook subscription is listed again");
                    }
                    missing = !ok;
                }
                Err(error) => {
                    if !failing {
                        tracing::warn!(error = %error, "cannot check the webhook subscription (GET /subscriptions); retrying (logged once until it works)");
                    }
                    failing = true;
                }
            }
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscription(url: &str, types: Option<&[&str]>) -> Subscription {
        Subscription {
            url: url.to_owned(),
            time: 1_775_000_000_000,
            update_types: types.map(|t| t.iter().map(|s| (*s).to_owned()).collect()),
        }
    }

    #[test]
    fn ours_lists_the_five_types_to_the_url() {
        let all = MEMBERSHIP_TYPES.to_vec();
        let ours = subscription("https://h.example/max/updates", Some(&all));
        assert!(is_ours(&ours, None));
        assert!(is_ours(&ours, Some("https://h.example/max/updates")));
        assert!(!is_ours(&ours, Some("https://other.example/max/updates")));
        assert!(is_ours(
            &subscription("https://h.example/max/updates", None),
            None
        ));
        assert!(!is_ours(
            &subscription("https://h.example/max/updates", Some(&all[..4])),
            None
        ));
        assert!(!is_ours(
            &subscription("https://h.example/bot/hook", Some(&all)),
            None
        ));
        let seconds = Subscription {
            time: 1_775_000_000,
            ..ours.clone()
        };
        assert!(describe(&[seconds]).contains("\t2026-"));
        let text = describe(&[ours]);
        assert!(
            text.starts_with("https://h.example/max/updates\t2026-"),
            "{text}"
        );
        assert!(text.contains("user_added,user_removed"), "{text}");
        assert!(!text.contains("warning"), "{text}");
    }

    #[test]
    fn a_subscription_to_more_than_the_membership_types_is_warned_about() {
        let mut types = MEMBERSHIP_TYPES.to_vec();
        assert!(!delivers_more(&subscription(
            "https://h/max/updates",
            Some(&types)
        )));
        assert!(delivers_more(&subscription("https://h/max/updates", None)));
        types.push("message_created");
        let broad = subscription("https://h/max/updates", Some(&types));
        assert!(delivers_more(&broad));
        assert!(describe(&[broad]).contains("warning: https://h/max/updates also receives"));
    }
}
