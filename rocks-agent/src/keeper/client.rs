//! The application side: a redirected connection arrives on the loopback listener; find where
//! it was going, and carry it there through the peer agent, or plainly when there is none.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering::Relaxed};

use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{
    driver::{self, Ending, Side},
    establish::{EstablishError, establish},
};
use crate::{
    agent::Shared,
    net::{self, ConnectError},
    registry::{EntryGuard, HandshakePhase, Mode, Role},
    session::{Event, OpenError, Session},
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
    let peer = SocketAddr::new(dst.ip(), shared.peer_port);

    let mut transport = match net::connect_marked(peer, shared.probe_timeout).await {
        Ok(t) => t,
        Err(e) => {
            let why = match e {
                ConnectError::Refused => "no agent listens on the peer port".to_owned(),
                ConnectError::TimedOut(t) => format!("the peer port did not answer within {t:?}"),
                ConnectError::Other(e) => format!("cannot reach the peer port: {e}"),
            };
            return fall_back(&shared, app, dst, &entry, &why, true).await;
        }
    };
    let mut session = Session::connect(std::time::Instant::now(), shared.session_config.clone(), &shared.secret, dst);
    match establish(&mut session, &mut transport).await {
        Ok(id) => {
            shared.registry.counters.kept.fetch_add(1, Relaxed);
            entry.set_mode(Mode::Kept);
            entry.set_session_id(id.to_string());
            entry.set_state("active");
            info!(id = entry.id, session = %id, app = %app_addr, %dst, "kept connection opened");
            let side = Side::Client {
                peer,
                connect_timeout: shared.session_config.handshake_timeout,
                path_changes: shared.path_changes.as_ref().map(|tx| tx.subscribe()),
            };
            let ending =
                driver::run(session, transport, driver::Local::Connected(app), side, &entry, shared.stopping.subscribe()).await;
            log_ending(&entry, &ending);
        }
        Err(EstablishError::Open(OpenError::NotAllowed)) => {
            // The host has an agent, but that address is not its own (a VIP, a NAT): go direct
            // this time without marking the host.
            fall_back(&shared, app, dst, &entry, "the peer agent does not own the destination address", false).await;
        }
        Err(EstablishError::Open(e)) => {
            info!(
                id = entry.id,
                app = %app_addr,
                %dst,
                error = %e,
                "destination refused through the peer agent; resetting the application connection"
            );
            net::abort(app);
        }
        Err(e) => {
            shared.registry.record_handshake_failure(HandshakePhase::Open, e.failure());
            // Wrong secret, not a rocks peer, version mismatch, silence: all mean this host
            // cannot keep connections for us now; the negative cache expires on its own.
            fall_back(&shared, app, dst, &entry, &format!("session handshake failed: {e}"), true).await;
        }
    }
}

fn log_ending(entry: &EntryGuard, ending: &Ending) {
    let (id, app, dst) = (entry.id, entry.peer, entry.destination);
    let session = entry.session_id().unwrap_or_default();
    match ending {
        Ending::Event(Event::Closed) => info!(id, %session, %app, %dst, "kept connection closed"),
        Ending::Event(Event::PeerReset { code }) => info!(id, %session, %app, %dst, code, "kept connection reset by the peer"),
        Ending::Event(Event::Expired) => {
            warn!(id, %session, %app, %dst, "peer unreachable for longer than --keep-for; connection closed")
        }
        Ending::Stopped => info!(id, %session, %app, %dst, "kept connection reset: the agent is stopping"),
        other => warn!(id, %session, %app, %dst, ending = ?other, "kept connection ended"),
    }
}

/// Carries the connection as plain TCP. With `remember`, the destination host goes into the
/// negative cache, so later connects to it are not redirected at all.
async fn fall_back(shared: &Shared, app: TcpStream, dst: SocketAddr, entry: &EntryGuard, why: &str, remember: bool) {
    entry.set_mode(Mode::Plain);
    shared.registry.counters.plain_fallbacks.fetch_add(1, Relaxed);
    if remember {
        if let Some(r) = &shared.redirector {
            r.add_negative(dst.ip(), shared.negative_ttl);
        }
    }
    info!(
        id = entry.id,
        app = %entry.peer,
        %dst,
        why,
        remembered = remember,
        "no usable peer agent: carrying this connection as plain TCP"
    );
    match net::connect_marked(dst, shared.dial_timeout).await {
        Ok(direct) => {
            entry.set_state("relaying");
            match super::plain::relay(app, direct, entry, shared.stopping.subscribe()).await {
                Ok((up, down)) => info!(id = entry.id, app = %entry.peer, %dst, up, down, "plain connection closed"),
                Err(e) => info!(id = entry.id, app = %entry.peer, %dst, error = %e, "plain connection ended"),
            }
        }
        Err(e) => {
            warn!(id = entry.id, app = %entry.peer, %dst, error = %e, "destination unreachable; resetting the application connection");
            net::abort(app);
        }
    }
}
