//! What the agent is carrying right now, for `status` and the metrics. Drivers update
//! their entry through cheap atomics; the entry leaves the registry when its guard drops.
//! Agent-wide totals that outlive connections (bytes carried, resume latencies, handshake
//! failures by reason) live here too.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::session::{HandshakeError, SessionError};

/// Which end of a kept connection this agent is.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The application connected from this host; we dialed the peer agent.
    Client,
    /// A peer agent asked us to connect to a server on this host.
    Server,
}

/// How a connection is carried.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Still deciding (probing the peer agent).
    Probing,
    /// Through a session with the peer agent.
    Kept,
    /// Plain TCP relay: the destination has no (usable) agent.
    Plain,
}

pub struct Entry {
    pub id: u64,
    pub role: Role,
    /// Client: the application socket's address; server: the peer agent's address.
    pub peer: SocketAddr,
    pub destination: SocketAddr,
    started: Instant,
    started_unix: u64,
    detail: Mutex<Detail>,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub buffered: AtomicU64,
    pub resumes: AtomicU64,
    /// Set once the entry's bytes moved into the registry's totals of closed connections.
    accounted: std::sync::atomic::AtomicBool,
}

struct Detail {
    mode: Mode,
    state: &'static str,
    session_id: Option<String>,
    last_resume_ms: Option<u64>,
}

impl Entry {
    pub fn set_mode(&self, mode: Mode) {
        self.detail.lock().expect("detail lock").mode = mode;
    }
    pub fn set_state(&self, state: &'static str) {
        self.detail.lock().expect("detail lock").state = state;
    }
    pub fn set_session_id(&self, id: String) {
        self.detail.lock().expect("detail lock").session_id = Some(id);
    }
    pub fn set_last_resume_ms(&self, ms: u64) {
        self.detail.lock().expect("detail lock").last_resume_ms = Some(ms);
    }
    /// The session id, once known (for log lines).
    pub fn session_id(&self) -> Option<String> {
        self.detail.lock().expect("detail lock").session_id.clone()
    }
}

/// One row of `status`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ConnectionStatus {
    pub id: u64,
    pub role: String,
    pub mode: String,
    pub state: String,
    pub peer: String,
    pub destination: String,
    pub session_id: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub buffered: u64,
    pub resumes: u64,
    pub last_resume_ms: Option<u64>,
    pub age_secs: u64,
    pub started_unix: u64,
}

/// Agent-wide counters.
#[derive(Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub kept: AtomicU64,
    pub plain_fallbacks: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub peer_sessions: AtomicU64,
    pub refused_targets: AtomicU64,
    pub transparent_failures: AtomicU64,
    pub connection_limit_reached: AtomicU64,
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub accepted: u64,
    pub kept: u64,
    pub plain_fallbacks: u64,
    pub handshake_failures: u64,
    pub peer_sessions: u64,
    pub refused_targets: u64,
    /// Connections reset because the dial from the client's address could not be made.
    #[serde(default)]
    pub transparent_failures: u64,
    /// Times the agent reached `--max-connections` and sent new connects direct.
    #[serde(default)]
    pub connection_limit_reached: u64,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    /// Guards alive, retired ones included: connection tasks still running.
    live: AtomicU64,
    entries: Mutex<BTreeMap<u64, Arc<Entry>>>,
    pub counters: Counters,
    /// Bytes of connections no longer listed, so the totals never go backwards.
    closed_bytes_sent: AtomicU64,
    closed_bytes_received: AtomicU64,
    /// Completed resumes and how long each took, by role (client, server).
    resume_latency: [Histogram; 2],
    /// Failed handshakes by phase (open, resume) and reason.
    handshake_failures: [[AtomicU64; HandshakeFailure::ALL.len()]; 2],
}

/// Removes its entry from the registry when dropped.
pub struct EntryGuard {
    registry: Arc<Registry>,
    pub entry: Arc<Entry>,
}

impl EntryGuard {
    /// Leaves `status` now, although the guard lives on (a session lingering after its close).
    pub fn retire(&self) {
        self.registry.entries.lock().expect("registry lock").remove(&self.entry.id);
        self.account_closed();
    }

    /// A resume completed after `took` (zero when it superseded a transport that still looked
    /// alive): counted on the connection and in the agent's latency histogram.
    pub fn record_resume(&self, took: Duration) {
        self.entry.resumes.fetch_add(1, Relaxed);
        self.entry.set_last_resume_ms(took.as_millis() as u64);
        self.registry.resume_latency[self.entry.role as usize].observe(took);
    }

    /// A handshake on a new transport of this connection failed (a refused resume).
    pub fn record_handshake_failure(&self, phase: HandshakePhase, reason: HandshakeFailure) {
        self.registry.record_handshake_failure(phase, reason);
    }

    /// Moves the entry's bytes into the totals of closed connections, once.
    fn account_closed(&self) {
        if !self.entry.accounted.swap(true, Relaxed) {
            self.registry.closed_bytes_sent.fetch_add(self.entry.bytes_sent.load(Relaxed), Relaxed);
            self.registry.closed_bytes_received.fetch_add(self.entry.bytes_received.load(Relaxed), Relaxed);
        }
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        // Removed from the list first, then accounted: a reader summing both never sees the
        // bytes twice (at worst, for an instant, once too few).
        self.registry.entries.lock().expect("registry lock").remove(&self.entry.id);
        self.account_closed();
        self.registry.live.fetch_sub(1, Relaxed);
    }
}

impl std::ops::Deref for EntryGuard {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl Registry {
    pub fn register(self: &Arc<Self>, role: Role, peer: SocketAddr, destination: SocketAddr) -> EntryGuard {
        let id = self.next_id.fetch_add(1, Relaxed) + 1;
        self.live.fetch_add(1, Relaxed);
        // One spelling per address: a dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let (peer, destination) = (canonical(peer), canonical(destination));
        let entry = Arc::new(Entry {
            id,
            role,
            peer,
            destination,
            started: Instant::now(),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            detail: Mutex::new(Detail { mode: Mode::Probing, state: "connecting", session_id: None, last_resume_ms: None }),
            bytes_sent: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            buffered: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            accounted: std::sync::atomic::AtomicBool::new(false),
        });
        self.entries.lock().expect("registry lock").insert(id, entry.clone());
        EntryGuard { registry: self.clone(), entry }
    }

    pub fn connections(&self) -> Vec<ConnectionStatus> {
        let entries = self.entries.lock().expect("registry lock");
        entries
            .values()
            .map(|e| {
                let d = e.detail.lock().expect("detail lock");
                ConnectionStatus {
                    id: e.id,
                    role: serde_plain(&e.role),
                    mode: serde_plain(&d.mode),
                    state: d.state.to_owned(),
                    peer: e.peer.to_string(),
                    destination: e.destination.to_string(),
                    session_id: d.session_id.clone(),
                    bytes_sent: e.bytes_sent.load(Relaxed),
                    bytes_received: e.bytes_received.load(Relaxed),
                    buffered: e.buffered.load(Relaxed),
                    resumes: e.resumes.load(Relaxed),
                    last_resume_ms: d.last_resume_ms,
                    age_secs: e.started.elapsed().as_secs(),
                    started_unix: e.started_unix,
                }
            })
            .collect()
    }

    /// Connection tasks still running (including server sessions lingering after a close).
    pub fn live_tasks(&self) -> u64 {
        self.live.load(Relaxed)
    }

    pub fn counters(&self) -> CountersSnapshot {
        let c = &self.counters;
        CountersSnapshot {
            accepted: c.accepted.load(Relaxed),
            kept: c.kept.load(Relaxed),
            plain_fallbacks: c.plain_fallbacks.load(Relaxed),
            handshake_failures: c.handshake_failures.load(Relaxed),
            peer_sessions: c.peer_sessions.load(Relaxed),
            refused_targets: c.refused_targets.load(Relaxed),
            transparent_failures: c.transparent_failures.load(Relaxed),
            connection_limit_reached: c.connection_limit_reached.load(Relaxed),
        }
    }

    /// Counts a failed handshake; initial ones (`Open`) also count in
    /// `counters.handshake_failures`, which `status` shows.
    pub fn record_handshake_failure(&self, phase: HandshakePhase, reason: HandshakeFailure) {
        if phase == HandshakePhase::Open {
            self.counters.handshake_failures.fetch_add(1, Relaxed);
        }
        self.handshake_failures[phase as usize][reason as usize].fetch_add(1, Relaxed);
    }

    /// The agent-wide totals the metrics show beyond `status`.
    pub fn totals(&self) -> Totals {
        // Closed totals are read after the list: an entry retiring in between is then counted
        // in neither or, for an instant, only once.
        let (mut sent, mut received, mut buffered) = (0, 0, 0);
        for e in self.entries.lock().expect("registry lock").values() {
            if !e.accounted.load(Relaxed) {
                sent += e.bytes_sent.load(Relaxed);
                received += e.bytes_received.load(Relaxed);
            }
            buffered += e.buffered.load(Relaxed);
        }
        let mut failures = Vec::new();
        for phase in [HandshakePhase::Open, HandshakePhase::Resume] {
            for reason in HandshakeFailure::ALL {
                failures.push((phase, reason, self.handshake_failures[phase as usize][reason as usize].load(Relaxed)));
            }
        }
        Totals {
            bytes_sent: sent + self.closed_bytes_sent.load(Relaxed),
            bytes_received: received + self.closed_bytes_received.load(Relaxed),
            buffered,
            resume_latency: [self.resume_latency[0].snapshot(), self.resume_latency[1].snapshot()],
            handshake_failures: failures,
        }
    }
}

/// Agent-wide totals, for the metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Totals {
    /// Bytes carried toward the peer (client: from the application; server: from the
    /// destination), listed and closed connections together.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unacknowledged bytes in the replay buffers of the listed connections.
    pub buffered: u64,
    /// By role: `[client, server]`.
    pub resume_latency: [HistogramSnapshot; 2],
    /// Every (phase, reason) pair, zeros included.
    pub handshake_failures: Vec<(HandshakePhase, HandshakeFailure, u64)>,
}

/// Upper bounds of the resume latency buckets, in seconds: from a quick resume after an
/// address change (milliseconds) to outages of hours.
pub const RESUME_BUCKETS: [f64; 14] =
    [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0, 3600.0];

/// A fixed-bucket histogram of durations (cumulative buckets are computed on read).
#[derive(Default)]
struct Histogram {
    /// Per bucket of [`RESUME_BUCKETS`], then one for larger values.
    buckets: [AtomicU64; RESUME_BUCKETS.len() + 1],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = RESUME_BUCKETS.iter().position(|&le| secs <= le).unwrap_or(RESUME_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(RESUME_BUCKETS.len());
        let mut total = 0;
        for (le, bucket) in RESUME_BUCKETS.iter().zip(&self.buckets) {
            total += bucket.load(Relaxed);
            cumulative.push((*le, total));
        }
        total += self.buckets[RESUME_BUCKETS.len()].load(Relaxed);
        HistogramSnapshot { buckets: cumulative, count: total, sum_secs: self.sum_micros.load(Relaxed) as f64 / 1e6 }
    }
}

/// A histogram as Prometheus shows it: cumulative counts per upper bound, count and sum.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    /// Every observation (the `+Inf` bucket).
    pub count: u64,
    pub sum_secs: f64,
}

/// Which handshake failed: opening a session, or resuming one on a new transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakePhase {
    Open = 0,
    Resume = 1,
}

impl HandshakePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakePhase::Open => "open",
            HandshakePhase::Resume => "resume",
        }
    }
}

/// Why a handshake failed, as a small fixed set (a metric label): the variants of
/// [`HandshakeError`], plus the transport failing underneath.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandshakeFailure {
    Timeout,
    NotARocksPeer,
    VersionMismatch,
    WrongSecret,
    UnknownSession,
    BadProof,
    Malformed,
    TransportClosed,
    /// The peer rejected it for a reason this version does not know, or the session failed
    /// for another reason while opening.
    Other,
}

impl HandshakeFailure {
    pub const ALL: [HandshakeFailure; 9] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::NotARocksPeer,
        HandshakeFailure::VersionMismatch,
        HandshakeFailure::WrongSecret,
        HandshakeFailure::UnknownSession,
        HandshakeFailure::BadProof,
        HandshakeFailure::Malformed,
        HandshakeFailure::TransportClosed,
        HandshakeFailure::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::NotARocksPeer => "not_a_rocks_peer",
            HandshakeFailure::VersionMismatch => "version_mismatch",
            HandshakeFailure::WrongSecret => "wrong_secret",
            HandshakeFailure::UnknownSession => "unknown_session",
            HandshakeFailure::BadProof => "bad_proof",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::TransportClosed => "transport_closed",
            HandshakeFailure::Other => "other",
        }
    }
}

impl From<&HandshakeError> for HandshakeFailure {
    fn from(e: &HandshakeError) -> Self {
        use crate::session::RejectReason;
        match e {
            HandshakeError::Timeout => HandshakeFailure::Timeout,
            HandshakeError::NotARocksPeer => HandshakeFailure::NotARocksPeer,
            HandshakeError::VersionMismatch { .. } | HandshakeError::PeerRejected(RejectReason::VersionMismatch) => {
                HandshakeFailure::VersionMismatch
            }
            HandshakeError::AuthFailed | HandshakeError::PeerRejected(RejectReason::AuthFailed) => HandshakeFailure::WrongSecret,
            HandshakeError::UnknownSession | HandshakeError::PeerRejected(RejectReason::UnknownSession) => {
                HandshakeFailure::UnknownSession
            }
            HandshakeError::BadProof => HandshakeFailure::BadProof,
            HandshakeError::Malformed(_) | HandshakeError::PeerRejected(RejectReason::Malformed) => HandshakeFailure::Malformed,
            HandshakeError::TransportClosed => HandshakeFailure::TransportClosed,
            HandshakeError::PeerRejected(RejectReason::Other(_)) => HandshakeFailure::Other,
        }
    }
}

impl From<&SessionError> for HandshakeFailure {
    fn from(e: &SessionError) -> Self {
        match e {
            SessionError::Handshake(h) => h.into(),
            SessionError::ResumeMismatch(_) => HandshakeFailure::Other,
        }
    }
}

fn serde_plain<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_leave_when_their_guard_drops() {
        let reg = Arc::new(Registry::default());
        let a = reg.register(Role::Client, "127.0.0.1:5000".parse().unwrap(), "192.0.2.2:22".parse().unwrap());
        a.set_mode(Mode::Kept);
        a.bytes_sent.fetch_add(10, Relaxed);
        let rows = reg.connections();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].mode, "kept");
        assert_eq!(rows[0].role, "client");
        assert_eq!(rows[0].bytes_sent, 10);
        drop(a);
        assert!(reg.connections().is_empty());
    }

    #[test]
    fn byte_totals_survive_the_connections() {
        let reg = Arc::new(Registry::default());
        let a = reg.register(Role::Client, "127.0.0.1:5000".parse().unwrap(), "192.0.2.2:22".parse().unwrap());
        let b = reg.register(Role::Server, "192.0.2.1:40000".parse().unwrap(), "192.0.2.2:80".parse().unwrap());
        a.bytes_sent.store(100, Relaxed);
        a.bytes_received.store(7, Relaxed);
        b.bytes_sent.store(1000, Relaxed);
        b.buffered.store(33, Relaxed);
        let t = reg.totals();
        assert_eq!((t.bytes_sent, t.bytes_received, t.buffered), (1100, 7, 33));
        b.retire();
        assert_eq!(reg.totals().bytes_sent, 1100, "a retired entry still counts, once");
        drop(b);
        drop(a);
        let t = reg.totals();
        assert_eq!((t.bytes_sent, t.bytes_received, t.buffered), (1100, 7, 0));
    }

    #[test]
    fn resumes_land_in_the_histogram_of_their_role() {
        let reg = Arc::new(Registry::default());
        let a = reg.register(Role::Client, "127.0.0.1:5000".parse().unwrap(), "192.0.2.2:22".parse().unwrap());
        a.record_resume(Duration::from_millis(40));
        a.record_resume(Duration::from_secs(90));
        a.record_resume(Duration::from_secs(100_000));
        assert_eq!(reg.connections()[0].resumes, 3);
        assert_eq!(reg.connections()[0].last_resume_ms, Some(100_000_000));
        let [client, server] = reg.totals().resume_latency;
        assert_eq!(server.count, 0);
        assert_eq!(client.count, 3);
        assert_eq!(client.buckets.iter().find(|(le, _)| *le == 0.05).unwrap().1, 1);
        assert_eq!(client.buckets.iter().find(|(le, _)| *le == 600.0).unwrap().1, 2);
        assert_eq!(client.buckets.last().unwrap().1, 2, "100000 s is above every bound");
        assert!((client.sum_secs - 100_090.04).abs() < 1e-6, "{}", client.sum_secs);
    }

    #[test]
    fn handshake_failures_by_phase_and_reason() {
        let reg = Registry::default();
        reg.record_handshake_failure(HandshakePhase::Open, (&HandshakeError::AuthFailed).into());
        reg.record_handshake_failure(HandshakePhase::Resume, (&HandshakeError::UnknownSession).into());
        assert_eq!(reg.counters().handshake_failures, 1, "status counts opening failures only");
        let t = reg.totals();
        assert_eq!(t.handshake_failures.len(), 2 * HandshakeFailure::ALL.len());
        let n = |p, r| t.handshake_failures.iter().find(|(pp, rr, _)| *pp == p && *rr == r).unwrap().2;
        assert_eq!(n(HandshakePhase::Open, HandshakeFailure::WrongSecret), 1);
        assert_eq!(n(HandshakePhase::Resume, HandshakeFailure::UnknownSession), 1);
        assert_eq!(n(HandshakePhase::Open, HandshakeFailure::Timeout), 0);
    }
}
