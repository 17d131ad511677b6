//! Rights per chat (`/members/me`), membership changes that move counts and emit MAX's events
//! only where the bot is an administrator, the bot joining and leaving, titles, drift.

use std::time::Duration;

use maxsim::{AdminRights, MemberChange, SimConfig};
use serde_json::json;

use crate::helpers::{quiet, types_of, Sim};

const CHAT: i64 = -70_000_000_000_001;
const OTHER: i64 = -70_000_000_000_002;

fn admin() -> AdminRights {
    AdminRights {
        is_admin: true,
        read_all_messages: true,
    }
}

#[tokio::test]
async fn members_me_shows_the_bots_rights_and_answers_403_or_404_where_get_chat_does() {
    let sim = Sim::start(SimConfig {
        bot_user_id: 777,
        ..quiet()
    })
    .await;
    sim.sim.set_admin(CHAT, admin());
    let (status, me) = sim.get(&format!("/chats/{CHAT}/members/me")).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(
        (me["user_id"].clone(), me["is_bot"].clone()),
        (json!(777), json!(true))
    );
    assert_eq!(me["is_admin"], true);
    let permissions = me["permissions"].as_array().unwrap();
    assert!(permissions.contains(&json!("read_all_messages")), "{me}");

    let (status, me) = sim.get(&format!("/chats/{OTHER}/members/me")).await;
    assert_eq!((status, &me["is_admin"]), (200, &json!(false)));
    assert!(me["permissions"].is_null(), "{me}");

    // Promoted at run time, through the control endpoint.
    let (status, _) = sim
        .post(&format!("/_sim/admin/{OTHER}"), json!({"is_admin": true}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        sim.get(&format!("/chats/{OTHER}/members/me")).await.1["is_admin"],
        true
    );

    sim.sim.leave(CHAT);
    let (status, body) = sim.get(&format!("/chats/{CHAT}/members/me")).await;
    assert_eq!((status, &body["code"]), (403, &json!("chat.denied")));
    sim.sim.override_chat(
        OTHER,
        maxsim::ChatOverride {
            http_status: Some(404),
            ..Default::default()
        },
    );
    assert_eq!(sim.get(&format!("/chats/{OTHER}/members/me")).await.0, 404);
    let unauthorized = sim
        .http
        .get(sim.url(&format!("/chats/{CHAT}/members/me")))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test]
async fn the_admin_share_is_a_stable_slice_of_chats() {
    let sim = Sim::start(SimConfig {
        admin_permille: 300,
        ..quiet()
    })
    .await;
    let admins = (1..=2000)
        .filter(|g| sim.sim.admin_rights(-70_000_000_000_000 - g).is_admin)
        .count();
    assert!((500..700).contains(&admins), "{admins} of 2000 at 30%");
    let again = (1..=2000)
        .filter(|g| sim.sim.admin_rights(-70_000_000_000_000 - g).is_admin)
        .count();
    assert_eq!(admins, again);
}

#[tokio::test]
async fn a_membership_change_moves_the_count_and_emits_max_shaped_events_only_for_admins() {
    let sim = Sim::start(quiet()).await;
    sim.sim.set_admin(CHAT, admin());
    let before = sim.get(&format!("/chats/{CHAT}")).await.1["participants_count"]
        .as_i64()
        .unwrap();

    let (status, body) = sim
        .post(
            &format!("/_sim/members/{CHAT}"),
            json!({"add": 555, "inviter_id": 42}),
        )
        .await;
    assert_eq!(
        (status, &body["participants_count"]),
        (200, &json!(before + 1))
    );
    let (_, chat) = sim.get(&format!("/chats/{CHAT}")).await;
    assert_eq!(chat["participants_count"], before + 1);
    sim.sim
        .change_member(
            CHAT,
            &MemberChange {
                remove: Some(555),
                admin_id: Some(43),
                ..Default::default()
            },
        )
        .unwrap();
    sim.sim.remove_member(CHAT, 9_999).unwrap();
    assert_eq!(sim.sim.count_of(CHAT), before as i32 - 1);
    // Removing someone not in the chat changes nothing.
    let (status, _) = sim
        .post(&format!("/_sim/members/{CHAT}"), json!({"remove": 555}))
        .await;
    assert_eq!(status, 409);

    let events = sim.events_of(CHAT);
    assert_eq!(
        types_of(&events),
        ["user_added", "user_removed", "user_removed"]
    );
    let added = &events[0];
    let timestamp = added["timestamp"].as_i64().unwrap();
    assert!(timestamp > 1_700_000_000_000, "milliseconds: {timestamp}");
    assert_eq!(added["chat_id"], CHAT);
    assert_eq!(added["user"]["user_id"], 555);
    assert_eq!(added["user"]["is_bot"], false);
    assert!(added["user"]["first_name"].is_string() && added["user"]["name"].is_string());
    assert_eq!(
        (added["inviter_id"].clone(), added["is_channel"].clone()),
        (json!(42), json!(false))
    );
    assert_eq!(events[1]["admin_id"], 43);
    assert!(
        events[2].get("admin_id").is_none(),
        "left by themselves: {}",
        events[2]
    );

    // Where the bot is no administrator, counts move silently, as in MAX.
    let other_before = sim.sim.count_of(OTHER);
    sim.sim.add_member(OTHER, 1).unwrap();
    assert_eq!(sim.sim.count_of(OTHER), other_before + 1);
    // An administrator without read_all_messages gets nothing either.
    sim.sim.set_admin(
        OTHER,
        AdminRights {
            is_admin: true,
            read_all_messages: false,
        },
    );
    sim.sim.add_member(OTHER, 2).unwrap();
    assert!(
        sim.events_of(OTHER).is_empty(),
        "{:?}",
        sim.events_of(OTHER)
    );
}

#[tokio::test]
async fn the_bot_joining_and_leaving_emits_bot_added_and_bot_removed_without_admin_rights() {
    let sim = Sim::start(quiet()).await;
    sim.sim.not_joined(CHAT, None);
    assert_eq!(sim.get(&format!("/chats/{CHAT}")).await.0, 403);
    assert_eq!(
        sim.post(&format!("/_sim/join/{CHAT}"), json!({})).await.0,
        204
    );
    assert_eq!(sim.get(&format!("/chats/{CHAT}")).await.0, 200);
    sim.sim.join(CHAT);
    assert_eq!(
        sim.post(&format!("/_sim/leave/{CHAT}"), json!({})).await.0,
        204
    );
    assert_eq!(sim.get(&format!("/chats/{CHAT}")).await.0, 403);
    let events = sim.events_of(CHAT);
    assert_eq!(
        types_of(&events),
        ["bot_added", "bot_removed"],
        "a second join is no event"
    );
    assert_eq!(
        events[0]["user"]["user_id"], 123_123_123,
        "the owner added the bot"
    );
    assert_eq!(events[0]["is_channel"], false);

    // A join at a moment, with nobody asking, is noticed by the background.
    sim.sim.not_joined(OTHER, Some(Duration::from_millis(300)));
    sim.sim.add_chats([OTHER]);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(types_of(&sim.events_of(OTHER)), ["bot_added"]);
}

#[tokio::test]
async fn a_new_title_shows_in_get_chat_and_emits_chat_title_changed_for_admins_only() {
    let sim = Sim::start(quiet()).await;
    sim.sim.set_admin(CHAT, admin());
    let (status, _) = sim
        .post(&format!("/_sim/title/{CHAT}"), json!({"title": "Кафедра"}))
        .await;
    assert_eq!(status, 204);
    sim.sim.rename(OTHER, "quiet");
    assert_eq!(
        sim.get(&format!("/chats/{CHAT}")).await.1["title"],
        "Кафедра"
    );
    assert_eq!(
        sim.get(&format!("/chats/{OTHER}")).await.1["title"],
        "quiet"
    );
    let events = sim.events_of(CHAT);
    assert_eq!(types_of(&events), ["chat_title_changed"]);
    assert_eq!(events[0]["title"], "Кафедра");
    assert!(events[0]["user"]["user_id"].is_i64());
    assert!(sim.events_of(OTHER).is_empty());
}

/// The sum of +1 for each `user_added` and -1 for each `user_removed` of a chat.
fn net(events: &[serde_json::Value]) -> i32 {
    events
        .iter()
        .map(|e| match e["update_type"].as_str() {
            Some("user_added") => 1,
            Some("user_removed") => -1,
            _ => 0,
        })
        .sum()
}

#[tokio::test]
async fn drift_and_background_changes_in_admin_chats_are_events_that_add_up_to_the_count() {
    let chats: Vec<i64> = (1..=40).map(|g| -70_000_000_000_000 - g).collect();
    let sim = Sim::start(SimConfig {
        admin_permille: 500,
        churn_period_secs: 1,
        member_changes_per_sec: 20.0,
        ..quiet()
    })
    .await;
    sim.sim.add_chats(chats.iter().copied());
    let before: Vec<i32> = chats.iter().map(|id| sim.sim.count_of(*id)).collect();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (mut admin_moves, mut silent_moves) = (0, 0);
    for (id, before) in chats.iter().zip(before) {
        // The background keeps changing chats: read the count between two equal event lists.
        let (now, events) = loop {
            let events = sim.events_of(*id);
            let now = sim.sim.count_of(*id);
            if sim.events_of(*id).len() == events.len() {
                break (now, events);
            }
        };
        if sim.sim.events_reach(*id) {
            assert_eq!(
                now - before,
                net(&events),
                "chat {id}: every change has its event"
            );
            admin_moves += events.len();
        } else {
            assert!(events.is_empty(), "chat {id} without rights: {events:?}");
            silent_moves += usize::from(now != before);
        }
    }
    assert!(admin_moves > 10, "{admin_moves} events in the admin chats");
    assert!(silent_moves > 5, "{silent_moves} chats moved silently");
}
