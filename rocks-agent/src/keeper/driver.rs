//! The thin tokio driver around one [`Session`]: it moves bytes between the session core, the
//! session's TCP transports and the application (client) or destination (server) socket, and
//! fires the core's timers. All protocol decisions are the core's; see `session` for the call
//! order this follows.
//!
//! Transports come and go during a session (resumes), so each one gets a reader task and a
//! writer task talking to the driver through channels; the local socket is fixed for the whole
//! session and is polled directly, which lets the driver read it only while the replay buffer
//! has room (that is the back-pressure on the application).
use std::{
    collections::{HashMap, HashSet, VecDeque},
    io,
    net::SocketAddr,
    sync::atomic::Ordering::Relaxed,
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{broadcast, mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use crate::{
    net,
    registry::{EntryGuard, HandshakePhase},
    session::{CloseReason, Event, OpenError, ResumeAttempt, Session, State, TransportId},
};

/// Bytes read from a transport or the local socket in one go.
const READ_CHUNK: usize = 64 << 10;
/// Reads up to this size are copied into a buffer of their own (see `split_chunk`).
const SMALL_READ: usize = 2 << 10;
/// Received bytes taken from the core but not yet written to the local socket. Above this the
/// driver stops taking (`recv`), so the core stops acknowledging and the peer stops sending.
const LOCAL_OUT_LIMIT: usize = 256 << 10;
/// How long a transport the core is done with may take to flush its last bytes.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

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
    Client { peer: SocketAddr, connect_timeout: Duration, path_changes: Option<broadcast::Receiver<()>> },
    /// Receives resumes found by the peer listener.
    Server { resumes: mpsc::Receiver<ResumeOffer> },
}

/// The socket on this host the session's bytes go to and come from.
pub enum Local {
    /// Client: the application's accepted socket.
    Connected(TcpStream),
    /// Server: the destination, dialed only once the session is confirmed (a replayed
    /// handshake message must never make us connect anywhere).
    Dial { dst: SocketAddr, timeout: Duration, allowed: bool },
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
    Data(TransportId, Bytes),
    Lost(TransportId),
    Connected(TransportId, Result<TcpStream, net::ConnectError>),
    Dialed(Result<TcpStream, OpenError>),
}

struct Transport {
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    reader_task: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

impl Transport {
    fn start(id: TransportId, stream: TcpStream, inbound: mpsc::Sender<Inbound>) -> Transport {
        let (read, write) = stream.into_split();
        let (tx, rx) = mpsc::unbounded_channel();
        let reader_task = tokio::spawn(read_transport(id, read, inbound.clone()));
        let writer_task = tokio::spawn(write_transport(id, write, rx, inbound));
        Transport { writer: Some(tx), reader_task, writer_task }
    }

    /// Graceful: the writer flushes what it has (bounded by `CLOSE_LINGER`) and closes.
    fn close(mut self) {
        self.reader_task.abort();
        self.writer.take();
        let abort = self.writer_task.abort_handle();
        tokio::spawn(async move {
            tokio::time::sleep(CLOSE_LINGER).await;
            abort.abort();
        });
    }

    /// Abortive: the transport is dead or untrusted; nothing more is written to it.
    fn kill(self) {
        self.reader_task.abort();
        self.writer_task.abort();
    }
}

async fn read_transport(id: TransportId, read: OwnedReadHalf, inbound: mpsc::Sender<Inbound>) {
    loop {
        if read.readable().await.is_err() {
            let _ = inbound.send(Inbound::Lost(id)).await;
            return;
        }
        // The buffer exists only while bytes are waiting: an idle transport (most of them, with
        // thousands of kept connections) holds none. A burst reuses one buffer's capacity.
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            match read.try_read_buf(&mut buf) {
                Ok(0) => {
                    let _ = inbound.send(Inbound::Lost(id)).await;
                    return;
                }
                Ok(_) => {
                    if inbound.send(Inbound::Data(id, split_chunk(&mut buf))).await.is_err() {
                        return;
                    }
                    if buf.capacity() < READ_CHUNK / 4 {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    let _ = inbound.send(Inbound::Lost(id)).await;
                    return;
                }
            }
        }
    }
}

/// Takes what was read out of `buf`. A small read is copied out, so a queued ping does not pin
/// a whole read buffer; a large one is handed over without a copy.
fn split_chunk(buf: &mut BytesMut) -> Bytes {
    if buf.len() <= SMALL_READ {
        let chunk = Bytes::copy_from_slice(buf);
        buf.clear();
        chunk
    } else {
        buf.split().freeze()
    }
}

async fn write_transport(
    id: TransportId,
    mut write: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    inbound: mpsc::Sender<Inbound>,
) {
    while let Some(bytes) = rx.recv().await {
        if write.write_all(&bytes).await.is_err() {
            let _ = inbound.send(Inbound::Lost(id)).await;
            return;
        }
    }
    let _ = write.shutdown().await;
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
        Local::Dial { dst, timeout, allowed } => (None, Some((dst, timeout, allowed))),
    };
    let (inbound_tx, mut inbound) = mpsc::channel::<Inbound>(64);
    let mut transports: HashMap<TransportId, Transport> = HashMap::new();
    // Client: reconnects under way. The core may give one up (a newer path change) before its
    // connect finishes; a stream that arrives for an id no longer here is closed, not kept.
    let mut connecting: HashSet<TransportId> = HashSet::new();
    transports.insert(session.first_transport(), Transport::start(session.first_transport(), first, inbound_tx.clone()));

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
        flush_transmits(&mut session, &transports, now);
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
                    if let Some((dst, timeout, allowed)) = dial.take() {
                        if allowed {
                            let tx = inbound_tx.clone();
                            tokio::spawn(async move {
                                let result = net::connect_marked(dst, timeout).await.map_err(|e| match e {
                                    net::ConnectError::Refused => OpenError::Refused,
                                    net::ConnectError::TimedOut(_) => OpenError::TimedOut,
                                    net::ConnectError::Other(_) => OpenError::Unreachable,
                                });
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
            flush_transmits(&mut session, &transports, now);
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
                linger(&mut session, &mut transports, &mut inbound, &inbound_tx, &mut side, &mut stopping).await;
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
            Some(msg) = inbound.recv() => {
                let now = Instant::now().into_std();
                match msg {
                    Inbound::Data(t, bytes) => session.handle_input(now, t, &bytes),
                    Inbound::Lost(t) => session.transport_lost(now, t),
                    Inbound::Connected(t, Ok(stream)) => {
                        if connecting.remove(&t) {
                            transports.insert(t, Transport::start(t, stream, inbound_tx.clone()));
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
                    transports.insert(t, Transport::start(t, offer.stream, inbound_tx.clone()));
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
                    // Allocated per read rather than per session: an idle connection holds no
                    // read buffer (the core copies what it takes).
                    let want = session.send_capacity().min(READ_CHUNK);
                    let mut read_buf = Vec::with_capacity(want);
                    match l.try_read_buf(&mut read_buf) {
                        Ok(0) => {
                            local_read_done = true;
                            session.finish();
                        }
                        Ok(n) => {
                            let taken = session.send(&read_buf[..n]);
                            debug_assert_eq!(taken, n, "read no more than send_capacity");
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => {
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

/// Hands everything the core has for the transports to their writers.
fn flush_transmits(session: &mut Session, transports: &HashMap<TransportId, Transport>, now: std::time::Instant) {
    while let Some(t) = session.poll_transmit(now) {
        if let Some(tr) = transports.get(&t.transport).and_then(|tr| tr.writer.as_ref()) {
            let _ = tr.send(t.data);
        }
    }
}

/// Server, after a normal close: keep answering resumes for `SERVER_LINGER` so a client that
/// lost the final frames can still learn how the session ended.
async fn linger(
    session: &mut Session,
    transports: &mut HashMap<TransportId, Transport>,
    inbound: &mut mpsc::Receiver<Inbound>,
    inbound_tx: &mpsc::Sender<Inbound>,
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
            Some(msg) = inbound.recv() => match msg {
                Inbound::Data(t, bytes) => session.handle_input(Instant::now().into_std(), t, &bytes),
                Inbound::Lost(t) => session.transport_lost(Instant::now().into_std(), t),
                Inbound::Connected(..) | Inbound::Dialed(..) => {}
            },
            side_event = next_side_event(side) => {
                if let SideEvent::Resume(offer) = side_event {
                    let t = session.accept_resume(Instant::now().into_std(), *offer.attempt);
                    transports.insert(t, Transport::start(t, offer.stream, inbound_tx.clone()));
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
