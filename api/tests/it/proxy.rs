//! A TCP proxy between the api and Postgres that a test can freeze (stop forwarding, in both
//! directions and for new connections, without closing anything: a silent partition), thaw,
//! or set to drop the server's notifications (what a pooler in transaction mode does).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub address: SocketAddr,
    frozen: watch::Sender<bool>,
}

impl Proxy {
    /// Forwards to `upstream`; with `drop_notifications`, the server's NotificationResponse
    /// messages never reach the client (the connection must not use TLS: `sslmode=disable`).
    pub fn start(upstream: SocketAddr, drop_notifications: bool) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let address = std_listener.local_addr().unwrap();
        let listener = TcpListener::from_std(std_listener).unwrap();
        let (frozen, _) = watch::channel(false);
        let frozen_rx = frozen.subscribe();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let frozen = frozen_rx.clone();
                tokio::spawn(async move {
                    wait_thawed(&mut frozen.clone()).await;
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, frozen.clone(), false));
                    tokio::spawn(pump(server_read, client_write, frozen, drop_notifications));
                });
            }
        });
        Self { address, frozen }
    }

    /// The URL of `database` on the proxied server, without TLS.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@{}/{database}?sslmode=disable",
            self.address
        )
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

async fn wait_thawed(frozen: &mut watch::Receiver<bool>) {
    let _ = frozen.wait_for(|frozen| !*frozen).await;
}

/// Copies `from` to `to` while thawed; with `drop_notifications`, without the server's 'A'
/// (NotificationResponse) messages.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    drop_notifications: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        wait_thawed(&mut frozen).await;
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        wait_thawed(&mut frozen).await;
        let out = if drop_notifications {
            pending.extend_from_slice(&buffer[..n]);
            let mut out = Vec::new();
            // Server messages: a type byte, then a big-endian length that counts itself.
            while pending.len() >= 5 {
                let len = u32::from_be_bytes(pending[1..5].try_into().unwrap()) as usize;
                if pending.len() < 1 + len {
                    break;
                }
                let message: Vec<u8> = pending.drain(..1 + len).collect();
                if message[0] != b'A' {
                    out.extend_from_slice(&message);
                }
            }
            out
        } else {
            buffer[..n].to_vec()
        };
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}
