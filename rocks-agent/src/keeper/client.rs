//! The application side: a redirected connection arrives on the loopback listener; find where
//! it was going, and carry it there through the peer agent, or plainly when there is none.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering::Relaxed, time::Duration};

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
    session::{Event, HandshakeError, OpenError, Session},
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
    // Looked up before anything is read from the application socket; held until the
    // connection ends (a plain fallback reads without reporting: its fast-path messages
    // then stay bounded and take TCP).
    let mut fast_flow = shared.fast_path.as_ref().and_then(|f| f.connection(app_addr));

    // Held until the session is open (or given up): see `OPENING`.
    let opening = OPENING.acquire().await.expect("the semaphore is never closed");
    let mut transport = match dial_peer(peer, shared.probe_timeout).await {
        Ok(t) => t,
        Err(e) => {
            drop(opening);
            // Out of descriptors or buffers here says nothing about the peer: no negative entry.
            let remember = (!matches!(&e, ConnectError::Other(e) if out_of_resources(e))).then_some(shared.negative_ttl);
            let why = match e {
                ConnectError::Refused => "no agent listens on the peer port".to_owned(),
                ConnectError::TimedOut(t) => format!("the peer port did not answer within {t:?}"),
                ConnectError::Other(e) => format!("cannot reach the peer port: {e}"),
            };
            return fall_back(&shared, app, dst, &entry, &why, remember).await;
        }
    };
    let mut session = Session::connect(std::time::Instant::now(), shared.session_config.clone(), &shared.secret, dst);
    let opened = establish(&mut session, &mut transport).await;
    drop(opening);
    match opened {
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
                fast_flow: fast_flow.take(),
            };
            let ending =
                driver::run(session, transport, driver::Local::Connected(app), side, &entry, shared.stopping.subscribe()).await;
            log_ending(&entry, &ending);
        }
        Err(EstablishError::Open(OpenError::NotAllowed)) => {
            // The host has an agent, but that address is not its own (a VIP, a NAT): go direct
            // this time without marking the host.
            fall_back(&shared, app, dst, &entry, "the peer agent does not own the destination address", None).await;
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
            let ttl = negative_ttl_after(&e, shared.negative_ttl);
            fall_back(&shared, app, dst, &entry, &format!("session handshake failed: {e}"), Some(ttl)).await;
        }
    }
}

/// How many connections may be opening a session (peer dial and handshake) at once. A storm of
/// connects would otherwise start thousands of handshakes together, share the CPU between
/// them, and run many past the handshake timeout (measured: 318 of 4,000 connects at once on
/// 2 cores), which also put the healthy peer into the negative cache. Queued connections wait
/// here, before the dial, so neither end's handshake timer runs while they wait. One per
/// process: an agent is a process.
static OPENING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(OPENING_AT_ONCE);
const OPENING_AT_ONCE: usize = 256;

/// EMFILE, ENFILE, ENOBUFS, ENOMEM: this host is short of something, for now.
fn out_of_resources(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// How long a dial waits for descriptors to free up before giving up.
const RESOURCE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Dials the peer agent. In a connection storm the agent can run out of descriptors for a
/// moment (connects already redirected when `--max-connections` flipped are carried anyway):
/// waiting a little for some to close beats resetting a connection the application believes
/// is up.
async fn dial_peer(peer: SocketAddr, timeout: std::time::Duration) -> Result<TcpStream, ConnectError> {
    let deadline = tokio::time::Instant::now() + RESOURCE_WAIT;
    loop {
        match net::connect_marked(peer, timeout).await {
            Err(ConnectError::Other(e)) if out_of_resources(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            other => return other,
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

/// How long a host whose session handshake failed is left alone. A handshake that timed out
/// after the peer port accepted the connection may be an agent too busy to answer in time (a
/// storm of connects) rather than no agent: it is retried soon, not after the full
/// `--negative-ttl`. Everything else (wrong secret, not a rocks peer, another version) will not
/// change by itself.
fn negative_ttl_after(e: &EstablishError, configured: Duration) -> Duration {
    match e {
        EstablishError::Handshake(HandshakeError::Timeout) => configured.min(BUSY_PEER_TTL),
        _ => configured,
    }
}

/// See [`negative_ttl_after`].
const BUSY_PEER_TTL: Duration = Duration::from_secs(30);

/// Carries the connection as plain TCP. With `remember`, the destination host goes into the
/// negative cache for that long, so later connects to it are not redirected at all.
async fn fall_back(
    shared: &Shared,
    app: TcpStream,
    dst: SocketAddr,
    entry: &EntryGuard,
    why: &str,
    remember: Option<Duration>,
) {
    entry.set_mode(Mode::Plain);
    shared.registry.counters.plain_fallbacks.fetch_add(1, Relaxed);
    if let (Some(ttl), Some(r)) = (remember, &shared.redirector) {
        r.add_negative(dst.ip(), ttl);
    }
    info!(
        id = entry.id,
        app = %entry.peer,
        %dst,
        why,
        remembered_secs = remember.map(|t| t.as_secs()),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timed_out_handshake_is_retried_soon_a_refusal_is_not() {
        let ten_minutes = Duration::from_secs(600);
        let timeout = EstablishError::Handshake(HandshakeError::Timeout);
        assert_eq!(negative_ttl_after(&timeout, ten_minutes), BUSY_PEER_TTL);
        // A configured TTL shorter than the busy-peer one is kept as it is.
        assert_eq!(negative_ttl_after(&timeout, Duration::from_secs(5)), Duration::from_secs(5));
        for lasting in [HandshakeError::AuthFailed, HandshakeError::NotARocksPeer] {
            assert_eq!(negative_ttl_after(&EstablishError::Handshake(lasting), ten_minutes), ten_minutes);
        }
    }
}
