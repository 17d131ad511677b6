//! A simulator on a free port, an HTTP client that speaks to it as the bot, and a webhook
//! receiver that records what MAX posts.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use maxsim::{SimConfig, Simulator};
use serde_json::Value;

pub const TOKEN: &str = "sim-token";

pub struct Sim {
    pub sim: Simulator,
    pub address: SocketAddr,
    pub http: reqwest::Client,
}

impl Sim {
    pub async fn start(config: SimConfig) -> Self {
        shared::tls::init();
        let (sim, address) = Simulator::spawn(config).await;
        Self {
            sim,
            address,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// A GET as the bot: the status and the JSON body (`Null` when it is not JSON).
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(self.url(path))
            .header("authorization", TOKEN)
            .send()
            .await
            .expect("simulator answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn send(&self, method: reqwest::Method, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .http
            .request(method, self.url(path))
            .header("authorization", TOKEN)
            .json(&body)
            .send()
            .await
            .expect("simulator answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, body).await
    }

    /// The events of one chat in the simulator's log.
    pub fn events_of(&self, chat_id: i64) -> Vec<Value> {
        self.sim
            .events()
            .into_iter()
            .map(|event| event.update)
            .filter(|update| update["chat_id"] == chat_id)
            .collect()
    }
}

/// A config with no rate limits in the way, unless a test sets them.
pub fn quiet() -> SimConfig {
    SimConfig {
        rate_limit: 0,
        updates_rate_limit: 0,
        ..SimConfig::default()
    }
}

pub fn types_of(updates: &[Value]) -> Vec<&str> {
    updates
        .iter()
        .map(|u| u["update_type"].as_str().unwrap_or_default())
        .collect()
}

/// One POST the receiver got.
#[derive(Clone, Debug)]
pub struct Received {
    pub at: Instant,
    pub secret: Option<String>,
    pub body: Value,
}

/// How the receiver answers: a status per call in turn (the last one repeats), after a delay.
#[derive(Default)]
struct Script {
    statuses: Vec<u16>,
    delay: Duration,
    received: Vec<Received>,
}

#[derive(Clone, Default)]
pub struct Receiver {
    script: Arc<Mutex<Script>>,
    pub url: String,
}

impl Receiver {
    /// A receiver on a free loopback port answering `statuses` in turn (empty: 200).
    pub async fn start(statuses: &[u16], delay: Duration) -> Self {
        let mut receiver = Receiver::default();
        {
            let mut script = receiver.script.lock().unwrap();
            script.statuses = statuses.to_vec();
            script.delay = delay;
        }
        let app = Router::new()
            .route("/max/updates", post(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        receiver.url = format!("http://{}/max/updates", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    pub fn received(&self) -> Vec<Received> {
        self.script.lock().unwrap().received.clone()
    }

    /// Waits until `n` POSTs arrived, or panics after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let received = self.received();
            if received.len() >= n {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} POSTs within {within:?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    let (status, delay) = {
        let mut script = receiver.script.lock().unwrap();
        let n = script.received.len();
        script.received.push(Received {
            at: Instant::now(),
            secret: headers
                .get("x-max-bot-api-secret")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body,
        });
        let status = script
            .statuses
            .get(n)
            .or(script.statuses.last())
            .copied()
            .unwrap_or(200);
        (status, script.delay)
    };
    tokio::time::sleep(delay).await;
    StatusCode::from_u16(status).unwrap()
}
