//! The thin tokio driver around one [`Session`]: it moves bytes between the session core, the
//! session's TCP transports and the application (client) or destination (server) socket, and
//! fires the core's timers. All protocol decisions are the core's; see `session` for the call
//! order this follows.
//!
//! Everything is polled from the one driver task: the transports (which come and go during a
//! session, see `transport`) and the local socket, which the driver reads only while the replay
//! buffer has room (that is the back-pressure on the application). Only connects run as tasks
//! of their own, reporting back over a channel.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};

use bytes::Bytes;
use tokio::{
    io::AsyncWriteExt,
    net::TcpStream,
    sync::{broadcast, mpsc, watch},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::transport::{self, Ready, Transport};
use crate::{
    net,
    registry::{EntryGuard, HandshakePhase},
    session::{CloseReason, Event, OpenError, ResumeAttempt, Session, State, TransportId},
};

/// Received bytes taken from the core but not yet written to the local socket. Above this the
/// driver stops taking (`recv`), so the core stops acknowledging and the peer stops sending.
const LOCAL_OUT_LIMIT: usize = 256 << 10;

/// A resume offered to a server session: a new TCP connection whose msg1 named it.
pub struct ResumeOffer {
    pub stream: TcpStream,
    /// Boxed: the handshake state is ~1 KiB, and tokio allocates a channel's first block of
    /// 32 slots up front, so every kept session would carry ~30 KiB for a queue that is
    /// almost always empty.
    pub attempt: Box<ResumeAttempt>,
}

/// Which end this driver runs.
pub enum Side {
    /// Dials the peer agent again when the core asks (`Event::Reconnect`).
    Client {
        peer: SocketAddr,
        connect_timeout: Duration,
        path_changes: Option<broadcast::Receiver<()>>,
        /// Set when the application socket is on the sk_msg fast path: every read is reported
        /// to it (the `auto` bound counts what the agent has not read yet).
        fast_flow: Option<crate::fastpath::FlowHandle>,
    },
    /// Receives resumes found by the peer listener.
    Server { resumes: mpsc::Receiver<ResumeOffer> },
}

/// The socket on this host the session's bytes go to and come from.
pub enum Local {
    /// Client: the application's accepted socket.
    Connected(TcpStream),
    /// Server: the destination, dialed only once the session is confirmed (a replayed
    /// handshake message must never make us connect anywhere).
    Dial { dial: super::dial::Dial, allowed: bool },
}

/// The reset code a session carries to the peer when this agent stops.
pub const RESET_AGENT_STOPPING: u32 = 2;

/// How long a server session that closed normally stays reachable for a late resume, so a
/// client whose last frames were lost learns that everything arrived (like TCP's TIME_WAIT).
const SERVER_LINGER: Duration = Duration::from_secs(60);

/// How a session ended, for the caller's logs and counters.
#[derive(Debug)]
pub enum Ending {
    /// Ended by a terminal event of the core.
    Event(Event),
    /// The agent stopped: both ends were reset.
    Stopped,
}

enum Inbound {
    Connected(TransportId, Result<TcpStream, net::ConnectError>),
    Dialed(Result<TcpStream, OpenError>),
}

/// Runs one session to its end. `first` is the transport the session was created on.
/// `local` is the application socket (client) or the destination socket (server).
pub async fn run(
    mut session: Session,
    first: TcpStream,
    local: Local,
    mut side: Side,
    entry: &EntryGuard,
    mut stopping: watch::Receiver<bool>,
) -> Ending {
    let (mut local, mut dial) = match local {
        Local::Connected(stream) => (Some(stream), None),
        Local::Dial { dial, allowed } => (None, Some((dial, allowed))),
    };
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(64);
    let mut transports: HashMap<TransportId, Transport> = HashMap::new();
    // Client: reconnects under way. The core may give one up (a newer path change) before its
    // connect finishes; a stream that arrives for an id no longer here is closed, not kept.
    let mut connecting: HashSet<TransportId> = HashSet::new();
    transports.insert(session.first_transport(), Transport::new(first));

    let mut local_out: VecDeque<Bytes> = VecDeque::new();
    let mut local_out_bytes = 0usize;
    let mut local_read_done = false;
    let mut peer_finished = false;
    let mut local_write_done = false;
    let mut ending: Option<Ending> = None;
    // Set once we reset the session ourselves: the local socket is then closed abortively.
    let mut reset_by_us = false;
    let mut stopped = false;

    loop {
        if !stopped && *stopping.borrow_and_update() {
            // The agent stops: tell the peer (its side resets too) and reset ours now, without
            // waiting for the transport: the session cannot outlive this process.
            stopped = true;
            reset_by_us = true;
            session.reset(RESET_AGENT_STOPPING);
            if let Some(l) = local.take() {
                net::abort(l);
            }
            local_out.clear();
            local_out_bytes = 0;
            dial = None;
        }
        let now = Instant::now().into_std();
        flush_transmits(&mut session, &mut transports, now);
        // Take received bytes while the local socket can absorb them.
        while local_out_bytes < LOCAL_OUT_LIMIT {
            let Some(chunk) = session.recv() else { break };
            local_out_bytes += chunk.len();
            local_out.push_back(chunk);
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Established { id } => {
                    entry.set_session_id(id.to_string());
                    entry.set_state("active");
                    if let Some((dial, allowed)) = dial.take() {
                        if allowed {
                            let tx = inbound_tx.clone();
                            tokio::spawn(async move {
                                let result = dial.run().await;
                                let _ = tx.send(Inbound::Dialed(result)).await;
                            });
                        } else {
                            session.open_result(Err(OpenError::NotAllowed));
                        }
                    }
                }
                Event::Opened => entry.set_state("active"),
                Event::TransportClosed { transport, reason } => {
                    connecting.remove(&transport);
                    if let CloseReason::Handshake(e) = &reason {
                        entry.record_handshake_failure(HandshakePhase::Resume, e.into());
                    }
                    if let Some(tr) = transports.remove(&transport) {
                        debug!(id = entry.id, %transport, ?reason, "transport closed");
                        match reason {
                            CloseReason::Dead | CloseReason::Lost | CloseReason::Broken(_) => tr.kill(),
                            _ => tr.close(),
                        }
                    }
                }
                Event::Suspended => {
                    entry.set_state("suspended");
                    info!(
                        id = entry.id,
                        session = %entry.session_id().unwrap_or_default(),
                        peer = %entry.peer,
                        dst = %entry.destination,
                        "session suspended: transport lost"
                    );
                }
                Event::Reconnect { transport } => {
                    entry.set_state("resuming");
                    if let Side::Client { peer, connect_timeout, .. } = &side {
                        connecting.insert(transport);
                        let (peer, timeout, tx) = (*peer, *connect_timeout, inbound_tx.clone());
                        tokio::spawn(async move {
                            let result = net::connect_marked(peer, timeout).await;
                            let _ = tx.send(Inbound::Connected(transport, result)).await;
                        });
                    }
                }
                Event::Resumed { took } => {
                    entry.set_state("active");
                    entry.record_resume(took);
                    info!(
                        id = entry.id,
                        took_ms = %format_args!("{:.1}", took.as_secs_f64() * 1e3),
                        session = %entry.session_id().unwrap_or_default(),
                        peer = %entry.peer,
                        dst = %entry.destination,
                        "session resumed"
                    );
                }
                Event::PeerFinished => peer_finished = true,
                terminal => {
                    debug_assert!(terminal.is_terminal());
                    ending.get_or_insert(Ending::Event(terminal));
                }
            }
        }
        let stats = session.stats();
        entry.bytes_sent.store(stats.bytes_sent, Relaxed);
        entry.bytes_received.store(stats.bytes_received, Relaxed);
        entry.buffered.store(stats.buffered as u64, Relaxed);

        if let Some(ending) = ending {
            // Flush what the core still queued; the transports close gracefully.
            flush_transmits(&mut session, &mut transports, now);
            match (&ending, local.take()) {
                (Ending::Event(Event::Closed), Some(mut local)) if !reset_by_us => {
                    // Deliver what is left, then close normally.
                    for chunk in local_out.drain(..) {
                        if local.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                    let _ = local.shutdown().await;
                }
                (_, Some(local)) => net::abort(local),
                (_, None) => {}
            }
            if !stopped && matches!(ending, Ending::Event(Event::Closed)) && matches!(side, Side::Server { .. }) {
                // Logged now, not when the linger ends a minute later.
                info!(
                    id = entry.id,
                    session = %entry.session_id().unwrap_or_default(),
                    peer = %entry.peer,
                    dst = %entry.destination,
                    "kept connection closed"
                );
                entry.retire();
                linger(&mut session, &mut transports, &mut side, &mut stopping).await;
            }
            for (_, tr) in transports.drain() {
                tr.close();
            }
            return if stopped { Ending::Stopped } else { ending };
        }

        // Half-close toward the local socket once everything before the peer's fin is out.
        if let Some(l) = local.as_mut() {
            if peer_finished && local_out.is_empty() && !local_write_done {
                local_write_done = true;
                let _ = l.shutdown().await;
            }
        }

        let can_read_local =
            local.is_some() && !local_read_done && session.send_capacity() > 0 && session_carries_data(&session);
        let can_write_local = local.is_some() && !local_out.is_empty();
        let timer = session.poll_timeout().map(Instant::from_std);
        tokio::select! {
            ready = std::future::poll_fn(|cx| transport::poll_ready(cx, &transports)), if !transports.is_empty() => {
                transport_io(&mut session, &mut transports, ready);
            }
            Some(msg) = inbound.recv() => {
                let now = Instant::now().into_std();
                match msg {
                    Inbound::Connected(t, Ok(stream)) => {
                        if connecting.remove(&t) {
                            transports.insert(t, Transport::new(stream));
                            session.start_resume(now, t);
                        } else {
                            debug!(id = entry.id, transport = %t, "reconnect finished after it was abandoned; closing it");
                        }
                    }
                    Inbound::Connected(t, Err(e)) => {
                        debug!(id = entry.id, error = %e, "reconnect failed");
                        if connecting.remove(&t) {
                            session.transport_lost(now, t);
                        }
                    }
                    Inbound::Dialed(Ok(stream)) => {
                        let _ = stream.set_nodelay(true);
                        local = Some(stream);
                        session.open_result(Ok(()));
                    }
                    Inbound::Dialed(Err(e)) => {
                        info!(id = entry.id, error = %e, "cannot connect to the destination");
                        session.open_result(Err(e));
                    }
                }
            }
            side_event = next_side_event(&mut side) => match side_event {
                SideEvent::Resume(offer) => {
                    let now = Instant::now().into_std();
                    let _ = offer.stream.set_nodelay(true);
                    let t = session.accept_resume(now, *offer.attempt);
                    transports.insert(t, Transport::new(offer.stream));
                }
                SideEvent::PathChanged => {
                    info!(
                        id = entry.id,
                        session = %entry.session_id().unwrap_or_default(),
                        peer = %entry.peer,
                        dst = %entry.destination,
                        "network changed: resuming on a fresh transport"
                    );
                    session.path_changed(Instant::now().into_std());
                }
            },
            ready = readable(local.as_ref()), if can_read_local => {
                if let (Ok(()), Some(l)) = (ready, local.as_ref()) {
                    // Read into the runtime thread's scratch buffer and handed to the core at
                    // once (it copies what it takes): an idle connection holds no read buffer.
                    let want = session.send_capacity().min(transport::READ_CHUNK);
                    let read = transport::with_scratch(|buf| {
                        let read = l.try_read(&mut buf[..want]);
                        if let Ok(n @ 1..) = read {
                            let taken = session.send(&buf[..n]);
                            debug_assert_eq!(taken, n, "read no more than send_capacity");
                        }
                        read
                    });
                    match read {
                        Ok(0) => {
                            local_read_done = true;
                            session.finish();
                        }
                        Ok(n) => {
                            if let Side::Client { fast_flow: Some(flow), .. } = &mut side {
                                flow.read(n);
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
                            if let Side::Client { fast_flow: Some(flow), .. } = &side {
                                flow.read_failed(&e);
                            }
                            warn!(id = entry.id, error = %e, "local socket failed; resetting the session");
                            session.reset(1);
                            reset_by_us = true;
                            local_read_done = true;
                        }
                    }
                }
            }
            ready = writable(local.as_ref()), if can_write_local => {
                if let (Ok(()), Some(l)) = (ready, local.as_ref()) {
                    if let Err(e) = write_some(l, &mut local_out, &mut local_out_bytes) {
                        warn!(id = entry.id, error = %e, "writing to the local socket failed; resetting the session");
                        session.reset(1);
                        reset_by_us = true;
                        local_out.clear();
                        local_out_bytes = 0;
                        local_read_done = true;
                    }
                }
            }
            _ = sleep_until(timer), if timer.is_some() => {
                session.handle_timeout(Instant::now().into_std());
            }
            // Only wakes the loop; the check at its top acts on it.
            _ = stopping.changed(), if !stopped => {}
        }
    }
}

/// Hands everything the core has for the transports to their sockets: written at once as far
/// as the sockets take it (no wait for a readiness round), the rest when they become writable.
fn flush_transmits(session: &mut Session, transports: &mut HashMap<TransportId, Transport>, now: std::time::Instant) {
    while let Some(t) = session.poll_transmit(now) {
        if let Some(tr) = transports.get_mut(&t.transport) {
            tr.queue(t.data);
        }
    }
    let mut lost = Vec::new();
    for (&id, tr) in transports.iter_mut() {
        if !tr.write() {
            lost.push(id);
        }
        if let Some(backlogged) = tr.backlog_change() {
            session.set_backlogged(id, backlogged);
        }
    }
    for id in lost {
        session.transport_lost(now, id);
    }
}

/// Reads or writes the transport that is ready; a lost one is reported to the core.
fn transport_io(session: &mut Session, transports: &mut HashMap<TransportId, Transport>, ready: Ready) {
    let now = Instant::now().into_std();
    let (id, alive) = match ready {
        Ready::Readable(id) => match transports.get_mut(&id) {
            Some(tr) => (id, tr.read(|bytes| session.handle_input(now, id, bytes))),
            None => return,
        },
        Ready::Writable(id) => match transports.get_mut(&id) {
            Some(tr) => {
                let alive = tr.write();
                // Drained enough: the loop's next flush hands the socket data frames again.
                if let Some(backlogged) = tr.backlog_change() {
                    session.set_backlogged(id, backlogged);
                }
                (id, alive)
            }
            None => return,
        },
    };
    if !alive {
        session.transport_lost(now, id);
    }
}

/// Server, after a normal close: keep answering resumes for `SERVER_LINGER` so a client that
/// lost the final frames can still learn how the session ended.
async fn linger(
    session: &mut Session,
    transports: &mut HashMap<TransportId, Transport>,
    side: &mut Side,
    stopping: &mut watch::Receiver<bool>,
) {
    let deadline = Instant::now() + SERVER_LINGER;
    loop {
        let now = Instant::now().into_std();
        flush_transmits(session, transports, now);
        while let Some(event) = session.poll_event() {
            if let Event::TransportClosed { transport, .. } = event {
                if let Some(tr) = transports.remove(&transport) {
                    tr.close();
                }
            }
        }
        let timer = session.poll_timeout().map(Instant::from_std);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return,
            _ = stopping.changed() => return,
            ready = std::future::poll_fn(|cx| transport::poll_ready(cx, transports)), if !transports.is_empty() => {
                transport_io(session, transports, ready);
            }
            side_event = next_side_event(side) => {
                if let SideEvent::Resume(offer) = side_event {
                    let t = session.accept_resume(Instant::now().into_std(), *offer.attempt);
                    transports.insert(t, Transport::new(offer.stream));
                }
            }
            _ = sleep_until(timer), if timer.is_some() => session.handle_timeout(Instant::now().into_std()),
        }
    }
}

async fn readable(local: Option<&TcpStream>) -> io::Result<()> {
    match local {
        Some(l) => l.readable().await,
        None => std::future::pending().await,
    }
}

async fn writable(local: Option<&TcpStream>) -> io::Result<()> {
    match local {
        Some(l) => l.writable().await,
        None => std::future::pending().await,
    }
}

/// The client must not take application bytes before the server has connected to the
/// destination (until then a fallback to plain TCP must still be possible).
fn session_carries_data(session: &Session) -> bool {
    !matches!(session.state(), State::Connecting | State::Closed | State::Failed)
}

fn write_some(local: &TcpStream, out: &mut VecDeque<Bytes>, out_bytes: &mut usize) -> io::Result<()> {
    while let Some(front) = out.front_mut() {
        match local.try_write(front) {
            Ok(n) => {
                *out_bytes -= n;
                if n == front.len() {
                    out.pop_front();
                } else {
                    let _ = front.split_to(n);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum SideEvent {
    Resume(ResumeOffer),
    PathChanged,
}

/// The next thing that arrives from outside the session's own sockets; pending forever when
/// this side has no such source.
async fn next_side_event(side: &mut Side) -> SideEvent {
    match side {
        Side::Server { resumes } => match resumes.recv().await {
            Some(offer) => SideEvent::Resume(offer),
            None => std::future::pending().await,
        },
        Side::Client { path_changes: Some(rx), .. } => match rx.recv().await {
            // Lagged: notifications were missed; one resume covers them all.
            Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => SideEvent::PathChanged,
            Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
        },
        Side::Client { path_changes: None, .. } => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
