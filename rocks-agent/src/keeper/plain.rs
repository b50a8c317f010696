//! The plain relay used toward hosts without a (usable) agent: ordinary TCP semantics, with
//! half-close carried both ways.
use std::sync::atomic::Ordering::Relaxed;

use tokio::{net::TcpStream, sync::watch};
use tracing::debug;

use crate::{net, registry::Entry};

/// Relays until both directions are closed, or resets both ends when the agent stops.
/// Returns the bytes carried each way.
pub async fn relay(
    mut app: TcpStream,
    mut dst: TcpStream,
    entry: &Entry,
    mut stopping: watch::Receiver<bool>,
) -> std::io::Result<(u64, u64)> {
    let result = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut app, &mut dst) => r,
        _ = stopping.wait_for(|stop| *stop) => {
            net::abort(app);
            net::abort(dst);
            return Err(std::io::Error::other("agent stopping"));
        }
    };
    if let Ok((up, down)) = result {
        entry.bytes_sent.fetch_add(up, Relaxed);
        entry.bytes_received.fetch_add(down, Relaxed);
        debug!(id = entry.id, up, down, "plain relay finished");
    }
    result
}
