//! The session state machine: one kept connection between two agents, across any number of
//! TCP transports. See the module docs of `session` for the driver's call order and
//! `docs/protocol.md` for the protocol.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::{BufMut as _, Bytes, BytesMut};
use snow::{HandshakeState, TransportState};
use tracing::{debug, info};

use super::{
    CloseReason, Config, Event, SessionId, State, Stats, Transmit, TransportId,
    accept::{ResumeAttempt, put_noise_record, refusal},
    error::{HandshakeError, OpenError, ProtocolError, RejectReason, SessionError, WireError},
    handshake::{self, Key},
    stream::{RecvBuffer, SendBuffer},
    wire::{self, Answer, Frame, Hello, PreambleCheck},
};
use crate::secret::Secret;

/// Bytes gathered into one `Transmit` before handing it out (fewer, larger writes).
const TRANSMIT_BATCH: usize = 64 << 10;

/// One kept connection. See the `session` module docs for how to drive it.
pub struct Session {
    config: Config,
    role: Role,
    id: Option<SessionId>,
    resume_secret: Option<Key>,
    state: State,
    send: SendBuffer,
    recv: RecvBuffer,
    /// The transport carrying the session, once its handshake is done.
    active: Option<Link>,
    /// Transports whose handshake is in progress (client: at most one; server: resume
    /// attempts awaiting the client's confirmation).
    pending: Vec<Link>,
    /// Transports given up on, kept until their last bytes were handed out.
    closing: VecDeque<Closing>,
    events: VecDeque<Event>,
    next_transport: u64,
    /// When the session lost its last working transport (None while one works).
    suspended_at: Option<Instant>,
    /// Client: failed reconnect attempts since the last success (drives the back-off).
    attempts: u32,
    /// Client: when to ask the driver for the next transport.
    next_attempt: Option<Instant>,
    /// The last acknowledgement value we sent in any frame.
    ack_sent: u64,
    ack_due: bool,
    ack_deadline: Option<Instant>,
    /// Latest time seen in any call (for calls that take no `now`).
    now: Instant,
    /// Server: the open result, repeated on every new transport (the client ignores repeats).
    open_result: Option<u32>,
    /// Client: `Opened`/`OpenFailed` was reported.
    opened: bool,
    /// A reset waiting for a transport to carry it.
    pending_reset: Option<u32>,
    /// Client: the server said `Close`.
    close_received: bool,
    /// Server: the client has shown (by a frame or a resume proof) that it got msg2.
    confirmed: bool,
    /// Server: an unconfirmed session fails at this time.
    confirm_deadline: Option<Instant>,
    /// Server: how the session ended, repeated to a client that resumes after the end
    /// (its last transport may have died before the frame arrived).
    final_word: Option<Frame>,
    stats: Stats,
}

enum Role {
    /// The client keeps the cluster secret for resume handshakes.
    Client {
        secret: Secret,
    },
    Server,
}

struct Link {
    id: TransportId,
    reader: wire::RecordReader,
    /// Encrypted records ready to be written, in order.
    out: BytesMut,
    phase: Phase,
    /// Handshake deadline (None once established).
    deadline: Option<Instant>,
    last_recv: Instant,
    last_send: Instant,
    /// A frame arrived on it after the handshake (it really worked).
    got_frame: bool,
    /// The driver's socket for it holds more than it should: no new data frames for now.
    backlogged: bool,
}

enum Phase {
    /// Client: the driver is connecting a TCP transport for a resume.
    Connecting,
    /// Client: preamble and msg1 sent, waiting for the server's preamble and msg2.
    Handshake {
        hs: Box<HandshakeState>,
        got_preamble: bool,
        kind: HandshakeKind,
    },
    /// Server: msg2 sent on a resume; waiting for the client's `ResumeConfirm`.
    AwaitConfirm {
        ts: Box<TransportState>,
        expected_proof: Key,
        peer_received: u64,
    },
    Established {
        ts: Box<TransportState>,
    },
}

#[derive(Clone, Copy)]
enum HandshakeKind {
    Open,
    Resume { hash_after_msg1: Key },
}

struct Closing {
    id: TransportId,
    out: BytesMut,
    reason: CloseReason,
}

/// Where a link taken out for processing goes back to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Active,
    Pending,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("active", &self.active.as_ref().map(|l| l.id))
            .field("pending", &self.pending.iter().map(|l| l.id).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Link {
    fn new(id: TransportId, now: Instant, phase: Phase, deadline: Option<Instant>) -> Link {
        Link {
            id,
            reader: wire::RecordReader::default(),
            out: BytesMut::new(),
            phase,
            deadline,
            last_recv: now,
            last_send: now,
            got_frame: false,
            backlogged: false,
        }
    }

    fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established { .. })
    }

    /// Encrypts `frame` onto the output. Fails only on nonce exhaustion (2^64 frames).
    fn queue(&mut self, frame: &Frame) -> Result<(), CloseReason> {
        let Phase::Established { ts } = &mut self.phase else {
            return Ok(());
        };
        let mut plain = Vec::with_capacity(frame.encoded_len_hint());
        frame.encode(&mut plain);
        handshake::seal_record(ts, &plain, &mut self.out).map_err(|_| CloseReason::Broken(ProtocolError::Decrypt))
    }
}

impl Session {
    fn new(now: Instant, config: Config, role: Role) -> Session {
        let config = config.sanitized();
        Session {
            send: SendBuffer::new(config.max_buffered),
            recv: RecvBuffer::new(config.recv_limit()),
            config,
            role,
            id: None,
            resume_secret: None,
            state: State::Connecting,
            active: None,
            pending: Vec::new(),
            closing: VecDeque::new(),
            events: VecDeque::new(),
            next_transport: 0,
            suspended_at: None,
            attempts: 0,
            next_attempt: None,
            ack_sent: 0,
            ack_due: false,
            ack_deadline: None,
            now,
            open_result: None,
            opened: false,
            pending_reset: None,
            close_received: false,
            confirmed: true,
            confirm_deadline: None,
            final_word: None,
            stats: Stats::default(),
        }
    }

    fn alloc_transport(&mut self) -> TransportId {
        let id = TransportId(self.next_transport);
        self.next_transport += 1;
        id
    }

    /// Client: a new session over a freshly connected transport (its id is
    /// `first_transport()`); preamble and msg1 are queued for `poll_transmit`.
    pub fn connect(now: Instant, config: Config, secret: &Secret, dst: SocketAddr) -> Session {
        let mut s = Session::new(now, config, Role::Client { secret: secret.clone() });
        let id = s.alloc_transport();
        let mut hs = handshake::initiator(secret);
        let mut link = Link::new(id, now, Phase::Connecting, Some(now + s.config.handshake_timeout));
        match handshake::write(&mut hs, &Hello::Open { dst }.encode()) {
            Ok(msg1) => {
                link.out.put_slice(&wire::preamble());
                put_noise_record(&mut link.out, &msg1);
                link.phase = Phase::Handshake { hs: Box::new(hs), got_preamble: false, kind: HandshakeKind::Open };
                s.pending.push(link);
            }
            Err(e) => {
                // Unreachable with a working snow build; fail the session rather than panic.
                debug!(error = %e, "writing msg1 failed");
                s.close_link(link, CloseReason::Handshake(HandshakeError::AuthFailed));
                s.fail(SessionError::Handshake(HandshakeError::AuthFailed));
            }
        }
        s
    }

    /// Server: the session for an `Open` msg1 (called by `Accept`). It is unconfirmed until
    /// the client's first frame (or a resume proof) shows the client completed the
    /// handshake; only then does it report `Established`, which is when the driver connects to
    /// the destination. A replayed msg1 therefore never makes us connect anywhere: its
    /// session fails after `confirm_timeout`.
    /// The server preamble and msg2 are appended to `out` (the `Accept` writes them, so they
    /// go out at once, whatever the driver does before it runs the session).
    pub(crate) fn accept_new(
        now: Instant,
        config: Config,
        mut hs: HandshakeState,
        rest: BytesMut,
        out: &mut BytesMut,
    ) -> Result<Session, HandshakeError> {
        let id = SessionId(handshake::random());
        let seed: Key = handshake::random();
        // Writing a tiny msg2 and splitting cannot fail with a working snow build; treat a
        // failure like any failed handshake rather than panic.
        let msg2 = handshake::write(&mut hs, &Answer::Opened { session_id: id, resume_seed: seed }.encode())
            .map_err(|_| HandshakeError::AuthFailed)?;
        let final_hash = handshake::handshake_hash(&hs);
        let ts = hs.into_transport_mode().map_err(|_| HandshakeError::AuthFailed)?;
        let mut s = Session::new(now, config, Role::Server);
        s.id = Some(id);
        s.resume_secret = Some(handshake::resume_secret(&final_hash, &seed));
        s.confirmed = false;
        s.confirm_deadline = Some(now + s.config.confirm_timeout);
        let tid = s.alloc_transport();
        let mut link = Link::new(tid, now, Phase::Established { ts: Box::new(ts) }, None);
        out.put_slice(&wire::preamble());
        put_noise_record(out, &msg2);
        link.reader.push(&rest);
        let result = s.drive_link(now, &mut link, &mut Slot::Active);
        s.place(now, link, Slot::Active, result);
        Ok(s)
    }

    /// Server: the client proved it has the session.
    fn confirm(&mut self) {
        if self.confirmed {
            return;
        }
        self.confirmed = true;
        self.confirm_deadline = None;
        if let Some(id) = self.id {
            info!(session = %id, "session established");
            self.events.push_back(Event::Established { id });
        }
    }

    /// The transport the session was created on.
    pub fn first_transport(&self) -> TransportId {
        TransportId(0)
    }

    pub fn id(&self) -> Option<SessionId> {
        self.id
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn stats(&self) -> Stats {
        Stats { buffered: self.send.buffered(), ..self.stats.clone() }
    }

    fn is_client(&self) -> bool {
        matches!(self.role, Role::Client { .. })
    }

    fn is_ended(&self) -> bool {
        matches!(self.state, State::Closed | State::Failed)
    }

    // ---- app side -------------------------------------------------------------------------

    /// App bytes to send; returns how many were taken (0 when the replay buffer is full, after
    /// `finish`/`reset`, or once the session ended). Stop reading the app socket while it is 0.
    pub fn send(&mut self, data: &[u8]) -> usize {
        if self.is_ended() || self.pending_reset.is_some() {
            return 0;
        }
        let n = self.send.write(data);
        self.stats.bytes_sent += n as u64;
        n
    }

    /// How many bytes `send` would take now.
    pub fn send_capacity(&self) -> usize {
        if self.is_ended() || self.pending_reset.is_some() { 0 } else { self.send.capacity() }
    }

    /// The next chunk of the peer's stream for the app, in order, each byte once. Bytes are
    /// acknowledged to the peer only once taken here, so call it only when the app socket can
    /// accept more.
    pub fn recv(&mut self) -> Option<Bytes> {
        if self.is_ended() && !matches!(self.state, State::Closed) {
            return None;
        }
        let Some(chunk) = self.recv.read() else {
            self.check_fin();
            return None;
        };
        self.stats.bytes_received += chunk.len() as u64;
        if self.recv.ack_pos().saturating_sub(self.ack_sent) >= self.config.ack_every as u64 {
            self.ack_due = true;
        } else if self.ack_deadline.is_none() {
            self.ack_deadline = Some(self.now + self.config.ack_delay);
        }
        if self.recv.queued() == 0 {
            self.check_fin();
        }
        Some(chunk)
    }

    /// App EOF: a fin follows the last byte given to `send`.
    pub fn finish(&mut self) {
        if !self.is_ended() {
            self.send.finish();
        }
    }

    /// Abortive close by the app. The peer gets `PeerReset { code }`. Without a working
    /// transport the reset waits for the next one (or for expiry).
    pub fn reset(&mut self, code: u32) {
        if self.is_ended() || self.pending_reset.is_some() {
            return;
        }
        self.pending_reset = Some(code);
        self.flush_reset();
    }

    /// Sends a pending reset if a transport can carry it, and ends the session.
    fn flush_reset(&mut self) {
        let Some(code) = self.pending_reset else { return };
        if let Some(link) = self.active.as_mut()
            && link.is_established()
            && link.queue(&Frame::Reset { code }).is_ok()
        {
            self.final_word = Some(Frame::Reset { code });
            self.end(State::Closed, Event::Closed);
        }
    }

    /// Server: the outcome of connecting to the destination.
    pub fn open_result(&mut self, result: Result<(), OpenError>) {
        if self.is_client() || self.open_result.is_some() || self.is_ended() {
            return;
        }
        let code = match result {
            Ok(()) => 0,
            Err(e) => e.code(),
        };
        self.open_result = Some(code);
        if let Some(link) = self.active.as_mut() {
            let _ = link.queue(&Frame::OpenResult { code });
        }
        if code != 0 {
            self.final_word = Some(Frame::OpenResult { code });
            self.end(State::Closed, Event::Closed);
        }
    }

    // ---- transports -----------------------------------------------------------------------

    /// Raw bytes read from transport `transport`, in any chunking.
    pub fn handle_input(&mut self, now: Instant, transport: TransportId, bytes: &[u8]) {
        self.now = now;
        let Some((mut link, mut slot)) = self.take_link(transport) else { return };
        link.reader.push(bytes);
        let result = self.drive_link(now, &mut link, &mut slot);
        self.place(now, link, slot, result);
        self.maybe_reconnect(now);
    }

    /// The driver saw EOF or an error on `transport` (or could not connect it).
    pub fn transport_lost(&mut self, now: Instant, transport: TransportId) {
        self.now = now;
        // Already retired: its unsent bytes can no longer be written.
        if let Some(c) = self.closing.iter_mut().find(|c| c.id == transport) {
            c.out.clear();
        }
        let Some((mut link, slot)) = self.take_link(transport) else { return };
        link.out.clear();
        let reason = match link.phase {
            Phase::Connecting | Phase::Handshake { .. } | Phase::AwaitConfirm { .. } => {
                CloseReason::Handshake(HandshakeError::TransportClosed)
            }
            Phase::Established { .. } => CloseReason::Lost,
        };
        self.link_failed(now, link, slot, reason);
        self.maybe_reconnect(now);
    }

    /// The driver's socket for `transport` holds more than it should (the network takes it
    /// slower than the application writes): no new data frames for it until this is cleared,
    /// so what waits is the replay buffer's plaintext (which pushes back on the application)
    /// rather than an ever longer queue of sealed records. Acks, pings and handshakes still go,
    /// so the transport is not declared dead for it and a resume is not held up.
    pub fn set_backlogged(&mut self, transport: TransportId, backlogged: bool) {
        let links = self.active.iter_mut().chain(self.pending.iter_mut());
        for link in links.filter(|l| l.id == transport) {
            link.backlogged = backlogged;
        }
    }

    /// Client: the local network changed (address or route). The current transport may be
    /// bound to an address that is gone, so resume on a fresh one now rather than waiting for
    /// dead detection. The server ignores this (the client always reconnects).
    pub fn path_changed(&mut self, now: Instant) {
        self.now = now;
        if !self.is_client() || self.id.is_none() || self.is_ended() {
            return;
        }
        if let Some(link) = self.active.take() {
            self.close_link(link, CloseReason::PathChanged);
        }
        for link in std::mem::take(&mut self.pending) {
            self.close_link(link, CloseReason::PathChanged);
        }
        self.suspend(now);
        self.attempts = 0;
        self.next_attempt = Some(now);
        self.maybe_reconnect(now);
    }

    /// Client: the transport requested by `Event::Reconnect { transport }` is connected; the
    /// resume handshake starts on it. Stale ids are ignored.
    pub fn start_resume(&mut self, now: Instant, transport: TransportId) {
        self.now = now;
        let (Role::Client { secret }, Some(id)) = (&self.role, self.id) else { return };
        let Some(link) = self.pending.iter_mut().find(|l| l.id == transport) else { return };
        if !matches!(link.phase, Phase::Connecting) {
            return;
        }
        let mut hs = handshake::initiator(secret);
        let hello = Hello::Resume { session_id: id, received: self.recv.received_pos() };
        let Ok(msg1) = handshake::write(&mut hs, &hello.encode()) else { return };
        let hash_after_msg1 = handshake::handshake_hash(&hs);
        link.out.put_slice(&wire::preamble());
        put_noise_record(&mut link.out, &msg1);
        link.phase =
            Phase::Handshake { hs: Box::new(hs), got_preamble: false, kind: HandshakeKind::Resume { hash_after_msg1 } };
        link.last_recv = now;
        self.state = State::Resuming;
    }

    /// Server: continue a resume on a new transport (from `Accepted::Resume`). Returns the id
    /// the driver uses for that transport from now on. The session switches to it only when
    /// the client's first frame on it proves the resume secret; until then the current
    /// transport keeps working, and a forged or replayed attempt changes nothing.
    pub fn accept_resume(&mut self, now: Instant, attempt: ResumeAttempt) -> TransportId {
        self.now = now;
        let tid = self.alloc_transport();
        let ResumeAttempt { mut hs, session_id, peer_received, hash_after_msg1, rest } = attempt;
        let refuse = |hs| {
            let mut out = BytesMut::new();
            out.put_slice(&refusal(hs, RejectReason::UnknownSession));
            out
        };
        let Some(resume_secret) = self
            .resume_secret
            .filter(|_| !self.is_client() && self.id == Some(session_id) && self.state != State::Failed)
        else {
            let out = refuse(hs);
            self.closing.push_back(Closing {
                id: tid,
                out,
                reason: CloseReason::Handshake(HandshakeError::UnknownSession),
            });
            return tid;
        };
        let answer = Answer::Resumed {
            received: self.recv.received_pos(),
            proof: handshake::responder_proof(&resume_secret, &hash_after_msg1),
        };
        let Ok(msg2) = handshake::write(&mut hs, &answer.encode()) else {
            let out = refuse(hs);
            self.closing.push_back(Closing {
                id: tid,
                out,
                reason: CloseReason::Handshake(HandshakeError::AuthFailed),
            });
            return tid;
        };
        let final_hash = handshake::handshake_hash(&hs);
        let Ok(ts) = hs.into_transport_mode() else {
            self.closing.push_back(Closing {
                id: tid,
                out: BytesMut::new(),
                reason: CloseReason::Handshake(HandshakeError::AuthFailed),
            });
            return tid;
        };
        let phase = Phase::AwaitConfirm {
            ts: Box::new(ts),
            expected_proof: handshake::initiator_proof(&resume_secret, &final_hash),
            peer_received,
        };
        let mut link = Link::new(tid, now, phase, Some(now + self.config.handshake_timeout));
        link.out.put_slice(&wire::preamble());
        put_noise_record(&mut link.out, &msg2);
        link.reader.push(&rest);
        // Bound the attempts waiting for confirmation: replayed msg1s cannot pile up.
        while self.pending.len() >= self.config.max_pending_resumes {
            let oldest = self.pending.remove(0);
            self.close_link(oldest, CloseReason::Superseded);
        }
        if self.active.is_none() && !self.is_ended() {
            self.state = State::Resuming;
        }
        let mut slot = Slot::Pending;
        let result = self.drive_link(now, &mut link, &mut slot);
        self.place(now, link, slot, result);
        tid
    }

    fn take_link(&mut self, id: TransportId) -> Option<(Link, Slot)> {
        if self.active.as_ref().is_some_and(|l| l.id == id) {
            return self.active.take().map(|l| (l, Slot::Active));
        }
        let i = self.pending.iter().position(|l| l.id == id)?;
        Some((self.pending.remove(i), Slot::Pending))
    }

    /// Puts a link back after processing, or retires it.
    fn place(&mut self, now: Instant, link: Link, slot: Slot, result: Result<(), CloseReason>) {
        match result {
            Err(reason) => self.link_failed(now, link, slot, reason),
            // A resume attempt on an ended (lingering) server session stays until confirmed:
            // the client then learns how the session ended.
            Ok(()) if self.is_ended() && (slot == Slot::Active || self.is_client()) => {
                self.close_link(link, CloseReason::SessionEnded);
            }
            Ok(()) => match slot {
                Slot::Active => {
                    debug_assert!(self.active.is_none());
                    self.active = Some(link);
                }
                Slot::Pending => self.pending.push(link),
            },
        }
        // A reset requested while no transport worked goes out as soon as one does.
        if self.pending_reset.is_some() && !self.is_ended() {
            self.flush_reset();
        }
    }

    fn close_link(&mut self, link: Link, reason: CloseReason) {
        debug!(transport = %link.id, ?reason, "closing transport");
        if matches!(reason, CloseReason::Broken(_)) {
            self.stats.broken_transports += 1;
        }
        self.closing.push_back(Closing { id: link.id, out: link.out, reason });
    }

    /// A transport failed: what that means depends on what it was doing.
    fn link_failed(&mut self, now: Instant, link: Link, slot: Slot, reason: CloseReason) {
        let client_handshake = matches!(link.phase, Phase::Connecting | Phase::Handshake { .. });
        if slot == Slot::Active && !link.got_frame {
            // It died before carrying anything: back off as for a failed attempt.
            self.attempts = self.attempts.saturating_add(1);
        }
        let handshake_error = match &reason {
            CloseReason::Handshake(e) => Some(e.clone()),
            _ => None,
        };
        self.close_link(link, reason);
        if self.is_ended() {
            return;
        }
        if self.is_client() && self.graceful_end_due() {
            // The transport went away right after the server's `Close`: nothing to resume.
            self.end(State::Closed, Event::Closed);
            return;
        }
        match slot {
            Slot::Active => self.suspend(now),
            Slot::Pending if client_handshake => {
                self.attempt_failed(now, handshake_error.unwrap_or(HandshakeError::TransportClosed));
            }
            // A server resume attempt that failed changes nothing about the session.
            Slot::Pending => {
                if self.active.is_none() && self.pending.is_empty() && self.state == State::Resuming {
                    self.state = State::Suspended;
                }
            }
        }
    }

    /// The session has no working transport any more.
    fn suspend(&mut self, now: Instant) {
        if self.is_ended() {
            return;
        }
        if self.suspended_at.is_none() {
            self.suspended_at = Some(now);
            self.events.push_back(Event::Suspended);
            info!(session = ?self.id, "session suspended");
        }
        if self.active.is_none() {
            self.state = if self.pending.is_empty() { State::Suspended } else { State::Resuming };
        }
        if self.is_client() && self.pending.is_empty() && self.next_attempt.is_none() {
            self.next_attempt = Some(now + self.backoff());
        }
    }

    /// Delay before the next reconnect: none for the first attempt, then doubling.
    fn backoff(&self) -> Duration {
        match self.attempts {
            0 => Duration::ZERO,
            n => {
                let factor = 1u32 << (n - 1).min(16);
                self.config.backoff_initial.saturating_mul(factor).min(self.config.backoff_max)
            }
        }
    }

    fn attempt_failed(&mut self, now: Instant, error: HandshakeError) {
        debug!(%error, "handshake attempt failed");
        if self.id.is_none() {
            // The initial handshake: there is no session to keep.
            self.fail(SessionError::Handshake(error));
            return;
        }
        if error == HandshakeError::UnknownSession {
            // Authenticated (inside msg2): the peer really has no such session any more.
            if self.send.fin_acked() && self.recv.fin_delivered() {
                // It closed and forgot the session before its `Close` reached us; both
                // streams were complete, so nothing is lost.
                self.end(State::Closed, Event::Closed);
            } else {
                self.fail(SessionError::Handshake(error));
            }
            return;
        }
        self.attempts = self.attempts.saturating_add(1);
        self.next_attempt = Some(now + self.backoff());
        if self.active.is_none() {
            self.state = State::Suspended;
        }
    }

    /// Client: ask the driver for a transport when the back-off allows.
    fn maybe_reconnect(&mut self, now: Instant) {
        if !self.is_client()
            || self.is_ended()
            || self.id.is_none()
            || self.active.is_some()
            || !self.pending.is_empty()
        {
            return;
        }
        let Some(at) = self.next_attempt else { return };
        if now < at {
            return;
        }
        self.next_attempt = None;
        let id = self.alloc_transport();
        self.pending.push(Link::new(id, now, Phase::Connecting, Some(now + self.config.handshake_timeout)));
        self.events.push_back(Event::Reconnect { transport: id });
    }

    fn fail(&mut self, error: SessionError) {
        info!(session = ?self.id, %error, "session failed");
        self.end(State::Failed, Event::Failed(error));
    }

    /// Terminal transition: every transport is retired (after its queued bytes go out).
    fn end(&mut self, state: State, event: Event) {
        if self.is_ended() {
            return;
        }
        self.state = state;
        self.events.push_back(event);
        if let Some(link) = self.active.take() {
            self.close_link(link, CloseReason::SessionEnded);
        }
        for link in std::mem::take(&mut self.pending) {
            self.close_link(link, CloseReason::SessionEnded);
        }
        self.next_attempt = None;
        self.ack_deadline = None;
    }

    // ---- input processing -----------------------------------------------------------------

    /// Processes every complete record buffered on `link`. `slot` changes to `Active` when a
    /// handshake on it completes.
    fn drive_link(&mut self, now: Instant, link: &mut Link, slot: &mut Slot) -> Result<(), CloseReason> {
        loop {
            if self.is_ended() && *slot == Slot::Active {
                return Ok(());
            }
            match link.phase {
                Phase::Connecting => return Ok(()),
                Phase::Handshake { .. } => {
                    if !self.client_handshake(now, link, slot)? {
                        return Ok(());
                    }
                }
                Phase::AwaitConfirm { .. } => {
                    let Some(record) = link.reader.next_record() else { return Ok(()) };
                    self.confirm_resume(now, link, &record, slot)?;
                }
                Phase::Established { .. } => {
                    let Some(record) = link.reader.next_record() else { return Ok(()) };
                    self.on_record(now, link, &record)?;
                }
            }
        }
    }

    /// Client side of a handshake: returns true once it progressed (more records may follow).
    fn client_handshake(&mut self, now: Instant, link: &mut Link, slot: &mut Slot) -> Result<bool, CloseReason> {
        let hs_err = CloseReason::Handshake;
        let Phase::Handshake { hs, got_preamble, kind } = &mut link.phase else { return Ok(false) };
        let kind = *kind;
        if !*got_preamble {
            if wire::preamble_impossible(link.reader.peek()) {
                return Err(hs_err(HandshakeError::NotARocksPeer));
            }
            let Some(p) = link.reader.take_raw(wire::PREAMBLE_LEN) else { return Ok(false) };
            match wire::check_preamble(&p) {
                PreambleCheck::Ok => *got_preamble = true,
                PreambleCheck::NotRocks => return Err(hs_err(HandshakeError::NotARocksPeer)),
                PreambleCheck::Version(theirs) => {
                    return Err(hs_err(HandshakeError::VersionMismatch { ours: wire::VERSION, theirs }));
                }
            }
        }
        let Some(record) = link.reader.next_record() else { return Ok(false) };
        let msg2 = match record.split_first() {
            Some((&wire::REC_NOISE, msg2)) => msg2,
            Some((&wire::REC_REJECT, &[code])) => {
                // Unauthenticated: ends this attempt only, exactly as an EOF would.
                return Err(hs_err(HandshakeError::PeerRejected(RejectReason::from_code(code))));
            }
            _ => return Err(hs_err(HandshakeError::Malformed(WireError::Unexpected("handshake record")))),
        };
        let payload = handshake::read(hs, msg2).map_err(|_| hs_err(HandshakeError::AuthFailed))?;
        let answer = Answer::decode(&payload).map_err(|e| hs_err(HandshakeError::Malformed(e)))?;
        let final_hash = handshake::handshake_hash(hs);
        let peer_received = match (kind, answer) {
            (HandshakeKind::Open, Answer::Opened { session_id, resume_seed }) => {
                self.id = Some(session_id);
                self.resume_secret = Some(handshake::resume_secret(&final_hash, &resume_seed));
                None
            }
            (HandshakeKind::Resume { hash_after_msg1 }, Answer::Resumed { received, proof }) => {
                let Some(rs) = self.resume_secret else { return Err(hs_err(HandshakeError::BadProof)) };
                if !handshake::ct_eq(&handshake::responder_proof(&rs, &hash_after_msg1), &proof) {
                    return Err(hs_err(HandshakeError::BadProof));
                }
                Some(received)
            }
            (_, Answer::Refused { reason }) => {
                return Err(hs_err(match RejectReason::from_code(reason) {
                    RejectReason::UnknownSession => HandshakeError::UnknownSession,
                    other => HandshakeError::PeerRejected(other),
                }));
            }
            _ => return Err(hs_err(HandshakeError::Malformed(WireError::Unexpected("answer")))),
        };
        let Phase::Handshake { hs, .. } = std::mem::replace(&mut link.phase, Phase::Connecting) else {
            return Ok(false);
        };
        let ts = hs.into_transport_mode().map_err(|_| hs_err(HandshakeError::AuthFailed))?;
        link.phase = Phase::Established { ts: Box::new(ts) };
        link.deadline = None;
        link.last_recv = now;
        link.last_send = now;
        *slot = Slot::Active;
        self.state = State::Established;
        match peer_received {
            None => {
                let id = self.id.unwrap_or(SessionId([0; 16]));
                info!(session = %id, "session established");
                self.events.push_back(Event::Established { id });
                // The server creates the session only on our first frame (see `Accept`).
                link.queue(&Frame::Ack { offset: self.recv.ack_pos() })?;
                self.ack_sent = self.recv.ack_pos();
            }
            Some(received) => {
                let proof = handshake::initiator_proof(&self.resume_secret.unwrap_or_default(), &final_hash);
                link.queue(&Frame::ResumeConfirm { proof })?;
                self.resumed(now, received)?;
            }
        }
        Ok(true)
    }

    /// Server: the first frame on a resumed transport must prove the resume secret.
    fn confirm_resume(
        &mut self,
        now: Instant,
        link: &mut Link,
        record: &[u8],
        slot: &mut Slot,
    ) -> Result<(), CloseReason> {
        let Phase::AwaitConfirm { ts, expected_proof, peer_received } = &mut link.phase else { return Ok(()) };
        let (expected_proof, peer_received) = (*expected_proof, *peer_received);
        // A replayed msg1 got an answer it cannot read; whatever follows fails here.
        let plain = handshake::open(ts, record).map_err(|_| CloseReason::Handshake(HandshakeError::AuthFailed))?;
        match Frame::decode(Bytes::from(plain)) {
            Ok(Frame::ResumeConfirm { proof }) if handshake::ct_eq(&proof, &expected_proof) => {}
            Ok(Frame::ResumeConfirm { .. }) => return Err(CloseReason::Handshake(HandshakeError::BadProof)),
            Ok(_) => {
                return Err(CloseReason::Handshake(HandshakeError::Malformed(WireError::Unexpected(
                    "frame before resume-confirm",
                ))));
            }
            Err(e) => return Err(CloseReason::Handshake(HandshakeError::Malformed(e))),
        }
        let Phase::AwaitConfirm { ts, .. } = std::mem::replace(&mut link.phase, Phase::Connecting) else {
            return Ok(());
        };
        link.phase = Phase::Established { ts };
        if self.is_ended() {
            // A closed session kept (lingering) for a late resume: the client missed how it
            // ended. Repeat it, then let the transport go.
            if let Some(word) = self.final_word.clone() {
                link.queue(&Frame::Ack { offset: self.recv.ack_pos() })?;
                link.queue(&word)?;
            }
            return Err(CloseReason::SessionEnded);
        }
        link.deadline = None;
        link.last_recv = now;
        link.last_send = now;
        if let Some(old) = self.active.take() {
            self.close_link(old, CloseReason::Superseded);
        }
        *slot = Slot::Active;
        self.state = State::Established;
        self.confirm();
        if let Some(code) = self.open_result {
            link.queue(&Frame::OpenResult { code })?;
        }
        self.resumed(now, peer_received)
    }

    /// Both sides after a resume: retransmit from where the peer is.
    fn resumed(&mut self, now: Instant, peer_received: u64) -> Result<(), CloseReason> {
        if let Err(why) = self.send.rewind(peer_received) {
            self.fail(SessionError::ResumeMismatch(why));
            return Err(CloseReason::SessionEnded);
        }
        let took = self.suspended_at.take().map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        // `attempts` (the back-off) is reset only once a frame arrives on the new transport:
        // a peer that completes handshakes and then drops the transport must not get a
        // reconnect storm.
        self.next_attempt = None;
        self.stats.resumes += 1;
        self.stats.last_resume_took = Some(took);
        info!(session = ?self.id, ?took, "session resumed");
        self.events.push_back(Event::Resumed { took });
        // The peer may have missed acks we sent on the old transport.
        if self.recv.ack_pos() > 0 {
            self.ack_due = true;
        }
        Ok(())
    }

    /// One record on an established transport.
    fn on_record(&mut self, now: Instant, link: &mut Link, record: &[u8]) -> Result<(), CloseReason> {
        let Phase::Established { ts } = &mut link.phase else { return Ok(()) };
        let plain = handshake::open(ts, record).map_err(|_| CloseReason::Broken(ProtocolError::Decrypt))?;
        link.last_recv = now;
        link.got_frame = true;
        self.on_frame(link, plain)
    }

    /// One decrypted frame on an established transport.
    fn on_frame(&mut self, link: &mut Link, plain: Vec<u8>) -> Result<(), CloseReason> {
        let frame = Frame::decode(Bytes::from(plain)).map_err(|e| CloseReason::Broken(e.into()))?;
        self.attempts = 0;
        if !self.confirmed {
            self.confirm();
            self.state = State::Established;
        }
        let broken = CloseReason::Broken;
        match frame {
            Frame::Data { offset, data } => {
                self.recv.on_data(offset, data).map_err(broken)?;
            }
            Frame::Ack { offset } => self.on_ack(offset)?,
            Frame::Ping { ack } => {
                self.on_ack(ack)?;
                let ack = self.recv.ack_pos();
                link.queue(&Frame::Pong { ack })?;
                self.ack_sent = ack;
            }
            Frame::Pong { ack } => self.on_ack(ack)?,
            Frame::Fin { offset } => {
                self.recv.on_fin(offset).map_err(broken)?;
                self.check_fin();
            }
            Frame::Reset { code } => {
                info!(session = ?self.id, code, "peer reset");
                self.end(State::Closed, Event::PeerReset { code });
            }
            Frame::OpenResult { code } if self.is_client() => {
                if !self.opened {
                    self.opened = true;
                    if code == 0 {
                        self.events.push_back(Event::Opened);
                    } else {
                        self.end(State::Closed, Event::OpenFailed(OpenError::from_code(code)));
                    }
                }
            }
            Frame::Close if self.is_client() => self.close_received = true,
            other @ (Frame::OpenResult { .. } | Frame::ResumeConfirm { .. } | Frame::Close) => {
                return Err(broken(ProtocolError::Unexpected(other.name())));
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, ack: u64) -> Result<(), CloseReason> {
        self.send.on_ack(ack).map_err(CloseReason::Broken)
    }

    /// Reports the peer's fin once every byte before it was taken by `recv`.
    fn check_fin(&mut self) {
        if !self.is_ended() && self.recv.take_fin() {
            self.events.push_back(Event::PeerFinished);
            self.ack_due = true;
        }
    }

    /// Both directions finished, our fin acknowledged, our ack of theirs sent. The server
    /// then closes (and says so); the client waits for that `Close`.
    fn graceful_end_due(&self) -> bool {
        if self.is_ended() || !self.recv.fin_delivered() {
            false
        } else if self.is_client() {
            // `Close` means the server has our fin and our ack of its fin.
            self.close_received
        } else {
            self.send.fin_acked() && self.ack_sent >= self.recv.ack_pos()
        }
    }

    // ---- timers ---------------------------------------------------------------------------

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.is_ended() {
            self.expire_handshakes(now);
            return;
        }
        if self.confirm_deadline.is_some_and(|d| now >= d) {
            self.fail(SessionError::Handshake(HandshakeError::Timeout));
            return;
        }
        if let Some(at) = self.suspended_at
            && now >= at + self.config.keep_for
        {
            info!(session = ?self.id, "session expired");
            self.end(State::Failed, Event::Expired);
            return;
        }
        self.expire_handshakes(now);
        if self.is_ended() {
            return;
        }
        if let Some(link) = self.active.as_mut() {
            if now >= link.last_recv + self.config.dead_after {
                let link = self.active.take().expect("checked above");
                info!(session = ?self.id, transport = %link.id, "transport dead");
                self.link_failed(now, link, Slot::Active, CloseReason::Dead);
            } else if now >= link.last_send + self.config.ping_interval {
                let ack = self.recv.ack_pos();
                match link.queue(&Frame::Ping { ack }) {
                    Ok(()) => self.ack_sent = ack,
                    Err(reason) => {
                        let link = self.active.take().expect("checked above");
                        self.link_failed(now, link, Slot::Active, reason);
                    }
                }
            }
        }
        if self.ack_deadline.is_some_and(|d| now >= d) {
            self.ack_deadline = None;
            self.ack_due = true;
        }
        self.maybe_reconnect(now);
    }

    fn expire_handshakes(&mut self, now: Instant) {
        let expired: Vec<TransportId> =
            self.pending.iter().filter(|l| l.deadline.is_some_and(|d| now >= d)).map(|l| l.id).collect();
        for id in expired {
            if let Some((link, slot)) = self.take_link(id) {
                self.link_failed(now, link, slot, CloseReason::Handshake(HandshakeError::Timeout));
            }
        }
    }

    /// When `handle_timeout` should be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if self.is_ended() {
            // Only resume attempts on a lingering session have deadlines.
            for d in self.pending.iter().filter_map(|l| l.deadline) {
                consider(d);
            }
            return next;
        }
        if let Some(at) = self.suspended_at {
            consider(at + self.config.keep_for);
        }
        if let Some(d) = self.confirm_deadline {
            consider(d);
        }
        for link in &self.pending {
            if let Some(d) = link.deadline {
                consider(d);
            }
        }
        if let Some(link) = &self.active {
            consider(link.last_recv + self.config.dead_after);
            consider(link.last_send + self.config.ping_interval);
            if let Some(d) = self.ack_deadline {
                consider(d);
            }
            if self.ack_due && self.recv.ack_pos() > self.ack_sent {
                // An ack became due in a call without output (`recv`): wake the driver so it
                // calls `poll_transmit`, whatever order it polls in.
                consider(self.now);
            }
        }
        if self.is_client()
            && self.active.is_none()
            && self.pending.is_empty()
            && self.id.is_some()
            && let Some(at) = self.next_attempt
        {
            consider(at);
        }
        next
    }

    // ---- output ---------------------------------------------------------------------------

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next bytes to write, and to which transport. Write them in the order returned.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        self.now = now;
        loop {
            // Retired transports first: their last bytes (a final ack, a reset, a refusal),
            // then the event telling the driver to close them.
            while let Some(c) = self.closing.front_mut() {
                if !c.out.is_empty() {
                    return Some(Transmit { transport: c.id, data: c.out.split().freeze() });
                }
                let c = self.closing.pop_front().expect("front exists");
                self.events.push_back(Event::TransportClosed { transport: c.id, reason: c.reason });
            }
            if let Some(link) = self.pending.iter_mut().find(|l| !l.out.is_empty()) {
                link.last_send = now;
                return Some(Transmit { transport: link.id, data: link.out.split().freeze() });
            }
            let mut link = self.active.take()?;
            let mut result = self.fill(&mut link);
            let closing_now = result.is_ok() && link.is_established() && self.graceful_end_due();
            if closing_now && !self.is_client() {
                result = link.queue(&Frame::Close);
                self.final_word = Some(Frame::Close);
            }
            let data = (!link.out.is_empty()).then(|| {
                link.last_send = now;
                Transmit { transport: link.id, data: link.out.split().freeze() }
            });
            match result {
                Ok(()) => {
                    self.active = Some(link);
                    if closing_now {
                        info!(session = ?self.id, "session closed");
                        self.end(State::Closed, Event::Closed);
                    }
                    if data.is_some() || self.closing.is_empty() {
                        return data;
                    }
                }
                Err(reason) => {
                    self.link_failed(now, link, Slot::Active, reason);
                    self.maybe_reconnect(now);
                    if data.is_some() {
                        return data;
                    }
                }
            }
        }
    }

    /// Writes acks, data and the fin onto the active transport's output, up to one batch.
    fn fill(&mut self, link: &mut Link) -> Result<(), CloseReason> {
        if !link.is_established() || self.is_ended() {
            return Ok(());
        }
        let ack = self.recv.ack_pos();
        if self.ack_due && ack > self.ack_sent {
            link.queue(&Frame::Ack { offset: ack })?;
            self.ack_sent = ack;
        }
        if self.ack_sent >= ack {
            self.ack_due = false;
            self.ack_deadline = None;
        }
        while !link.backlogged && link.out.len() < TRANSMIT_BATCH {
            let Some((offset, data)) = self.send.next_chunk(self.config.max_frame_data) else { break };
            link.queue(&Frame::Data { offset, data })?;
        }
        if self.send.fin_due() {
            link.queue(&Frame::Fin { offset: self.send.end() })?;
            self.send.mark_fin_sent();
        }
        Ok(())
    }
}

#[cfg(test)]
impl Session {
    /// Test hook: the offsets the replay buffer holds, to check nothing outside is emitted.
    pub(crate) fn unacked_window(&self) -> (u64, u64) {
        (self.send.acked(), self.send.end())
    }

    pub(crate) fn active_transport(&self) -> Option<TransportId> {
        self.active.as_ref().map(|l| l.id)
    }

    pub(crate) fn consumed(&self) -> u64 {
        self.recv.consumed()
    }

    /// Test hook: corrupts the resume secret (a client that lost it, or an impostor).
    pub(crate) fn corrupt_resume_secret(&mut self) {
        if let Some(rs) = self.resume_secret.as_mut() {
            rs[0] ^= 1;
        }
    }
}
