//! The peer side: a peer agent opens a session and asks us to connect to a destination on this
//! host, or resumes a session we carry.
use std::{io, net::SocketAddr, sync::Arc, sync::atomic::Ordering::Relaxed};

use tokio::{io::AsyncWriteExt, net::TcpStream, sync::mpsc, time::Instant};
use tracing::{debug, info, warn};

use super::{
    dial,
    driver::{self, Ending, Local, ResumeOffer, Side},
};
use crate::{
    agent::Shared,
    net,
    registry::{HandshakeFailure, HandshakePhase, Role},
    session::{Accept, Accepted, Event, HandshakeError, Session},
};

/// Resumes waiting for their session's driver to pick them up.
const RESUME_QUEUE: usize = 4;

pub async fn handle(shared: Arc<Shared>, mut stream: TcpStream, from: SocketAddr) {
    // One spelling per address in the logs, as in `status`: the dual-stack listener reports
    // IPv4 peers as ::ffff:a.b.c.d.
    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
    let accepted = match accept(&shared, &mut stream).await {
        Ok(a) => a,
        Err(e) => {
            let reason = match &e {
                AcceptError::Handshake(h) => h.into(),
                AcceptError::Io(_) => HandshakeFailure::TransportClosed,
            };
            shared.registry.record_handshake_failure(HandshakePhase::Open, reason);
            warn!(peer = %from, error = %e, "refused a session handshake");
            return;
        }
    };
    match accepted {
        Accepted::New { session, dst } => open(shared, stream, from, session, dst).await,
        Accepted::Resume { session_id, attempt } => {
            let target = shared.sessions.lock().expect("sessions lock").get(&session_id).cloned();
            match target {
                Some(tx) => {
                    debug!(peer = %from, session = %session_id, "resume offered");
                    if tx.send(ResumeOffer { stream, attempt: Box::new(attempt) }).await.is_err() {
                        debug!(session = %session_id, "session ended while a resume was offered");
                    }
                }
                None => {
                    info!(peer = %from, session = %session_id, "resume for an unknown session refused");
                    let _ = stream.write_all(&attempt.refuse()).await;
                    let _ = stream.shutdown().await;
                }
            }
        }
    }
}

/// Why a peer's handshake did not complete.
#[derive(Debug, thiserror::Error)]
enum AcceptError {
    #[error(transparent)]
    Handshake(HandshakeError),
    #[error("transport failed during the handshake: {0}")]
    Io(#[from] io::Error),
}

/// Drives the responder handshake until the transport says what it is.
async fn accept(shared: &Shared, stream: &mut TcpStream) -> Result<Accepted, AcceptError> {
    let mut accept = Accept::new(std::time::Instant::now(), shared.session_config.clone(), &shared.secret);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        while let Some(bytes) = accept.poll_transmit() {
            stream.write_all(&bytes).await?;
        }
        if let Some(outcome) = accept.poll_outcome() {
            return outcome.map_err(AcceptError::Handshake);
        }
        let timer = accept.poll_timeout().map(Instant::from_std);
        tokio::select! {
            ready = stream.readable() => {
                ready?;
                match stream.try_read(&mut buf) {
                    Ok(0) => accept.transport_lost(),
                    Ok(n) => accept.handle_input(std::time::Instant::now(), &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => accept.transport_lost(),
                }
            }
            _ = async { match timer { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } } => {
                accept.handle_timeout(std::time::Instant::now());
            }
        }
    }
}

/// Only addresses of this host, and never our own peer port: no open relay, and nothing
/// reachable only on our loopback becomes reachable from outside.
fn allowed(shared: &Shared, dst: SocketAddr) -> bool {
    if dst.port() == shared.listen.port() {
        return false;
    }
    net::is_local_address(dst.ip()).unwrap_or(false)
}

/// Runs a new session. It stays unconfirmed until the client's first frame proves it holds
/// msg2; only then does the driver dial the destination, so a replayed msg1 dials nothing.
async fn open(shared: Arc<Shared>, stream: TcpStream, from: SocketAddr, session: Session, dst: SocketAddr) {
    let Some(id) = session.id() else { return };
    let allowed = allowed(&shared, dst);
    if !allowed {
        shared.registry.counters.refused_targets.fetch_add(1, Relaxed);
        warn!(peer = %from, %dst, "peer asked for a destination that is not an address of this host; refusing");
    }
    shared.registry.counters.peer_sessions.fetch_add(1, Relaxed);
    let entry = shared.registry.register(Role::Server, from, dst);
    entry.set_mode(crate::registry::Mode::Kept);
    entry.set_session_id(id.to_string());
    let (tx, rx) = mpsc::channel(RESUME_QUEUE);
    shared.sessions.lock().expect("sessions lock").insert(id, tx);
    info!(id = entry.id, session = %id, peer = %from, %dst, "serving a kept connection");
    // The address this first transport came from stays the connection's source for its whole
    // life, whichever address later resumes arrive from.
    let source = if shared.transparent { dial::Source::Client(from.ip()) } else { dial::Source::Own };
    let dial = dial::Dial { dst, timeout: shared.dial_timeout, source, registry: shared.registry.clone(), id: entry.id };
    let local = Local::Dial { dial, allowed };
    let ending = driver::run(session, stream, local, Side::Server { resumes: rx }, &entry, shared.stopping.subscribe()).await;
    shared.sessions.lock().expect("sessions lock").remove(&id);
    match ending {
        // The close itself was logged by the driver when it happened; this is the linger's end.
        Ending::Event(Event::Closed) => debug!(id = entry.id, session = %id, "closed session no longer answers resumes"),
        Ending::Event(Event::Failed(e)) => info!(id = entry.id, session = %id, peer = %from, %dst, error = %e, "session failed"),
        other => info!(id = entry.id, session = %id, peer = %from, %dst, ending = ?other, "kept connection ended"),
    }
}
