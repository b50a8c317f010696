//! The session protocol between two agents, as a pure state machine (sans-I/O, in the manner
//! of quinn-proto): no sockets, no tokio, no clock reads. Time comes in as `now` arguments;
//! bytes come in through `handle_input` and go out through `poll_transmit`. The wire format,
//! state diagram and security argument are in `docs/protocol.md`.
//!
//! # Roles
//!
//! * [`Session`]: one per kept app connection, on both agents. The client agent creates it
//!   with [`Session::connect`] once its TCP transport to the peer is connected; the server
//!   agent gets it from an [`Accept`].
//! * [`Accept`]: one per inbound TCP transport on the server, until the transport says
//!   whether it opens a new session ([`Accepted::New`]) or resumes one
//!   ([`Accepted::Resume`], handed to that session with [`Session::accept_resume`]).
//!
//! # Transports
//!
//! A session outlives its TCP transports. Each transport it uses has a [`TransportId`]
//! (unique within the session, chosen by the core). Input is tagged with the transport it was
//! read from, and every [`Transmit`] says which transport to write to, because during a
//! resume the server holds two at once: the old one (still working, as far as it knows) and
//! the new one (handshake done, waiting for the client's confirmation). The core says when it
//! is done with a transport through [`Event::TransportClosed`], after the last bytes for it
//! were handed out by `poll_transmit`; the driver then closes that TCP connection. The driver
//! tells the core about a TCP connection that failed or hit EOF with
//! [`Session::transport_lost`]. Ids the core no longer knows are ignored everywhere, so a
//! late read or error from a closed transport is harmless.
//!
//! # Call order for a driver
//!
//! Client:
//! 1. Connect TCP to the peer agent; then `Session::connect(now, ..)`. Its first transport is
//!    [`Session::first_transport`].
//! 2. Loop:
//!    * bytes read from transport `t`: `handle_input(now, t, &bytes)`; EOF or error on `t`:
//!      `transport_lost(now, t)`;
//!    * when `poll_timeout()` passes: `handle_timeout(now)`;
//!    * app socket readable and `send_capacity() > 0`: read at most that much, `send(&buf)`;
//!      app EOF: `finish()`; app error/reset: `reset(code)`;
//!    * network change (netlink): `path_changed(now)`;
//!    * after each of the above: write out every `poll_transmit(now)` (in order, each to its
//!      transport), write every `recv()` chunk to the app socket (call `recv()` only when the
//!      app socket can take more: what is not taken is not acknowledged, which is the flow
//!      control), then handle every `poll_event()`, then re-arm the timer from
//!      `poll_timeout()`.
//! 3. On [`Event::Reconnect`]`{ transport }`: connect a new TCP transport to the peer and call
//!    `start_resume(now, transport)` (or `transport_lost(now, transport)` if that connect
//!    fails). The core times the attempt out itself and schedules the back-off.
//! 4. On a terminal event ([`Event::is_terminal`]): write out the remaining `poll_transmit`
//!    output, close the app socket (abortively for `PeerReset`, `Expired`, `Failed`,
//!    `OpenFailed`) and drop the session.
//!
//! Server: for each accepted TCP connection make an `Accept` and feed it input and timeouts
//! until `poll_outcome()` answers; write out its `poll_transmit()` in every case (msg2 of a new
//! session, or a rejection).
//! * `Accepted::New { session, dst }`: put the session in the session table at once (a resume
//!   may arrive for it) and run the same loop as the client on `session.first_transport()`
//!   (a server never sees `Reconnect`). When it reports `Event::Established` (the client
//!   proved it completed the handshake), connect to `dst` (only if it is an address of this
//!   host) and call `open_result(..)`. Do not connect earlier: an unconfirmed session may come
//!   from a replayed handshake message, and fails by itself after `confirm_timeout`.
//! * `Accepted::Resume { session_id, attempt }`: look the session up; if found,
//!   `let t = session.accept_resume(now, attempt)` and feed that connection's input to the
//!   session as transport `t`; if not, write `attempt.refuse()` to the connection and close it.
//!
//! A `Closed` server session should stay in the session table for a while (a linger, like TCP's
//! TIME_WAIT, e.g. a minute): a client whose transport died before the server's final `Close`
//! (or `Reset`, or failed `OpenResult`) arrived resumes, and the lingering session repeats it.
//! Without the linger the client still ends cleanly when both streams were complete, and fails
//! otherwise.

mod accept;
mod error;
mod handshake;
mod machine;
mod stream;
mod wire;

#[cfg(test)]
mod tests;

use std::{fmt, time::Duration};

pub use accept::{Accept, Accepted, ResumeAttempt};
pub use error::{HandshakeError, OpenError, ProtocolError, RejectReason, SessionError, WireError};
pub use machine::Session;

/// Tunables. Every bound has a name here.
#[derive(Debug, Clone)]
pub struct Config {
    /// Replay buffer bound: sent but unacknowledged bytes per session and direction.
    pub max_buffered: usize,
    /// Largest data payload per frame (clamped to what fits one Noise message).
    pub max_frame_data: usize,
    /// Acknowledge after the driver took this many bytes (a quarter of the peer's replay
    /// buffer keeps it draining smoothly; agents of one cluster share a configuration).
    pub ack_every: usize,
    /// Acknowledge at most this long after taking bytes, even below `ack_every`.
    pub ack_delay: Duration,
    /// Send a ping when nothing was sent for this long.
    pub ping_interval: Duration,
    /// Declare a transport dead when nothing was received for this long.
    pub dead_after: Duration,
    /// Limit for a handshake, including the TCP connect of a resume attempt.
    pub handshake_timeout: Duration,
    /// Server: a new session the client has not confirmed (by a frame or a resume) within
    /// this time fails. Long enough for a client that lost its first transport right after
    /// the handshake to resume through a short outage; short enough that replayed `Open`
    /// messages (which can never be confirmed) do not pile up. Drivers should also cap the
    /// number of unconfirmed sessions.
    pub confirm_timeout: Duration,
    /// How long a session without a transport waits for its peer before it fails.
    pub keep_for: Duration,
    /// First reconnect delay after a failed attempt; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Server: resume handshakes awaiting confirmation at once per session (the oldest is
    /// dropped), so replayed resume messages cannot pile up transports.
    pub max_pending_resumes: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_buffered: 8 << 20,
            // As large as a Noise message allows: per-frame costs (nonce, tag, record
            // header, a wake-up) are paid a quarter as often as with 16 KiB frames.
            max_frame_data: wire::MAX_DATA_PAYLOAD,
            ack_every: 256 << 10,
            ack_delay: Duration::from_millis(20),
            ping_interval: Duration::from_secs(1),
            // Both ends ping every second when idle, so 2.5 s is two and a half missed pings:
            // a lost ping is retransmitted by TCP well within it, and a black hole is noticed
            // within 3 s.
            dead_after: Duration::from_millis(2500),
            handshake_timeout: Duration::from_secs(2),
            confirm_timeout: Duration::from_secs(30),
            keep_for: Duration::from_secs(72 * 3600),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            max_pending_resumes: 4,
        }
    }
}

impl Config {
    /// Clamps values that would break the protocol (zero sizes, frames that do not fit).
    pub(crate) fn sanitized(mut self) -> Config {
        self.max_buffered = self.max_buffered.max(1);
        self.max_frame_data = self.max_frame_data.clamp(1, wire::MAX_DATA_PAYLOAD);
        self.ack_every = self.ack_every.clamp(1, (self.max_buffered / 4).max(1));
        self.max_pending_resumes = self.max_pending_resumes.max(1);
        self
    }

    /// Bound on undelivered received bytes. An honest peer never has more than its own
    /// `max_buffered` unacknowledged; allow generous slack for differing configurations.
    pub(crate) fn recv_limit(&self) -> usize {
        (4 * self.max_buffered).max(64 << 20)
    }
}

/// Identifies a session between two agents (random, chosen by the server).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// One TCP transport of a session, as numbered by the core (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransportId(pub u64);

impl fmt::Display for TransportId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// Bytes to write to one transport, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub transport: TransportId,
    pub data: bytes::Bytes,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Client: the initial handshake is in progress. Server: the client has not yet
    /// confirmed the new session.
    Connecting,
    /// A working transport carries the session.
    Established,
    /// No working transport. The client reconnects with back-off; the server waits.
    Suspended,
    /// A resume handshake is in progress and no other transport works.
    Resuming,
    /// Ended normally (both directions finished), by a reset, or after a failed open.
    Closed,
    /// Ended by an error or by `keep_for` expiry.
    Failed,
}

/// Why the core is done with a transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Nothing arrived for `dead_after`.
    Dead,
    /// Undecryptable or invalid input: the transport cannot be trusted any more. The session
    /// itself is unharmed.
    Broken(ProtocolError),
    /// A newer transport took over (a resume completed).
    Superseded,
    /// The client's network changed; it resumes on a fresh transport.
    PathChanged,
    /// The driver reported EOF or an error.
    Lost,
    /// The handshake on this transport failed.
    Handshake(HandshakeError),
    /// The session ended.
    SessionEnded,
}

/// Something the driver must know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The session exists on both sides. Client: the initial handshake finished. Server: the
    /// client confirmed it; connect to the destination now (not before: an unconfirmed
    /// session may come from a replayed handshake message).
    Established { id: SessionId },
    /// Client: the server connected to the destination.
    Opened,
    /// Client: the server could not connect to the destination. Terminal.
    OpenFailed(OpenError),
    /// The peer finished its direction; every byte before it was returned by `recv()`.
    PeerFinished,
    /// The peer's app reset the connection. Terminal.
    PeerReset { code: u32 },
    /// Close this TCP transport (its last bytes were already returned by `poll_transmit`).
    TransportClosed { transport: TransportId, reason: CloseReason },
    /// The session lost its transport.
    Suspended,
    /// Client: connect a new TCP transport to the peer and call `start_resume(now, transport)`.
    Reconnect { transport: TransportId },
    /// A transport carries the session again; `took` is the time since it was suspended
    /// (zero when a resume superseded a transport that still looked alive).
    Resumed { took: Duration },
    /// No transport for `keep_for`. Terminal.
    Expired,
    /// Ended normally: both directions finished and acknowledged, or our reset was sent, or
    /// (server) the open failed and the client was told. Terminal.
    Closed,
    /// Ended by an unrecoverable error. Terminal.
    Failed(SessionError),
}

impl Event {
    /// After a terminal event the session does nothing more except flush `poll_transmit`.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::OpenFailed(_) | Event::PeerReset { .. } | Event::Expired | Event::Closed | Event::Failed(_)
        )
    }
}

/// Counters for `rocks-agent status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// App bytes accepted by `send`.
    pub bytes_sent: u64,
    /// App bytes returned by `recv`.
    pub bytes_received: u64,
    /// Sent but not yet acknowledged bytes in the replay buffer.
    pub buffered: usize,
    /// Completed resumes.
    pub resumes: u64,
    /// Duration of the last outage that ended in a resume.
    pub last_resume_took: Option<Duration>,
    /// Transports closed because they were broken (bad input), for diagnostics.
    pub broken_transports: u64,
}
