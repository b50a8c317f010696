//! The application side: a redirected connection arrives on the loopback listener; find where
//! it was going, and carry it there.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering::Relaxed};

use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::{
    agent::Shared,
    net,
    registry::{Mode, Role},
};

pub async fn handle(shared: Arc<Shared>, app: TcpStream, app_addr: SocketAddr) {
    shared.registry.counters.accepted.fetch_add(1, Relaxed);
    let Some(redirector) = shared.redirector.as_ref() else { return };
    let Some(dst) = redirector.take_original_destination(app_addr) else {
        warn!(app = %app_addr, "redirected connection with no recorded destination; closing it");
        net::abort(app);
        return;
    };
    let entry = shared.registry.register(Role::Client, app_addr, dst);
    entry.set_mode(Mode::Plain);
    match net::connect_marked(dst, shared.dial_timeout).await {
        Ok(direct) => {
            entry.set_state("relaying");
            shared.registry.counters.plain_fallbacks.fetch_add(1, Relaxed);
            info!(id = entry.id, %dst, "plain relay");
            let _ = super::plain::relay(app, direct, &entry).await;
        }
        Err(e) => {
            warn!(id = entry.id, %dst, error = %e, "destination unreachable; resetting the application connection");
            net::abort(app);
        }
    }
}
