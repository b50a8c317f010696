//! The plain relay used toward hosts without a (usable) agent: ordinary TCP semantics, with
//! half-close carried both ways.
use std::sync::atomic::Ordering::Relaxed;

use tokio::net::TcpStream;
use tracing::debug;

use crate::registry::Entry;

/// Relays until both directions are closed. Returns the bytes carried each way.
pub async fn relay(mut app: TcpStream, mut dst: TcpStream, entry: &Entry) -> std::io::Result<(u64, u64)> {
    let result = tokio::io::copy_bidirectional(&mut app, &mut dst).await;
    if let Ok((up, down)) = result {
        entry.bytes_sent.fetch_add(up, Relaxed);
        entry.bytes_received.fetch_add(down, Relaxed);
        debug!(id = entry.id, up, down, "plain relay finished");
    }
    result
}
