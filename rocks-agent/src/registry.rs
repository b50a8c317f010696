//! What the agent is carrying right now, for `status` (and later metrics). Drivers update
//! their entry through cheap atomics; the entry leaves the registry when its guard drops.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

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
}

#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub accepted: u64,
    pub kept: u64,
    pub plain_fallbacks: u64,
    pub handshake_failures: u64,
    pub peer_sessions: u64,
    pub refused_targets: u64,
}

#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    /// Guards alive, retired ones included: connection tasks still running.
    live: AtomicU64,
    entries: Mutex<BTreeMap<u64, Arc<Entry>>>,
    pub counters: Counters,
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
    }
}

impl Drop for EntryGuard {
    fn drop(&mut self) {
        self.registry.live.fetch_sub(1, Relaxed);
        self.registry.entries.lock().expect("registry lock").remove(&self.entry.id);
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
}
