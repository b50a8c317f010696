//! The sk_msg fast path between applications and this agent: its mode (`--fast-path`,
//! switchable at run time through the control socket), the per-connection read accounting
//! the `auto` mode's bound relies on, and `auto`'s supervisor, which switches the fast path
//! off for new connections when a fast-path connection misbehaves.
//!
//! The kernel side is `rocks-ebpf/src/fastpath.rs`; what each mode does and risks is in the
//! README ("The fast path"). A mode applies to connections established after it was set:
//! `sock_ops` records it per connection, because moving a live connection between paths
//! could reorder its bytes or strand those already queued on the old path.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use rocks_common::{AF_INET, AF_INET6, FastFlow, LocalKey, fast_path_mode};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    redirect::{RedirectError, Redirector},
    sockmap_probe::{self, Defect},
};

/// Set (to anything) to make `auto` ignore the sockmap probe's findings: a testing knob.
pub const SKIP_PROBE_ENV: &str = "ROCKS_FAST_PATH_IGNORE_PROBE";

/// `--fast-path`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// Redirect both directions between the application and the agent with sk_msg, unbounded.
    On,
    /// Always use the ordinary loopback TCP path.
    Off,
    /// The application's sends only, bounded, and off by itself when it misbehaves.
    Auto,
}

impl FastPathMode {
    /// The value of `Config::fast_path` the programs read.
    pub fn kernel_value(self) -> u32 {
        match self {
            FastPathMode::Off => fast_path_mode::OFF,
            FastPathMode::On => fast_path_mode::ON,
            FastPathMode::Auto => fast_path_mode::AUTO,
        }
    }

    fn from_kernel(v: u32) -> FastPathMode {
        match v {
            fast_path_mode::ON => FastPathMode::On,
            fast_path_mode::AUTO => FastPathMode::Auto,
            _ => FastPathMode::Off,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FastPathMode::On => "on",
            FastPathMode::Off => "off",
            FastPathMode::Auto => "auto",
        }
    }
}

impl std::fmt::Display for FastPathMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FastPathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(FastPathMode::On),
            "off" => Ok(FastPathMode::Off),
            "auto" => Ok(FastPathMode::Auto),
            other => Err(format!(
                "unknown fast-path mode {other:?} (expected on, off or auto)"
            )),
        }
    }
}

/// What `status` shows about the fast path.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPathStatus {
    /// The mode asked for (`--fast-path`, or the last `rocks-agent fast-path`).
    pub mode: String,
    /// The mode new connections get: `mode`, or `off` once `auto` turned itself off.
    pub effective: String,
    /// Why `auto` turned itself off, if it did.
    pub off_because: Option<String>,
    /// Connections that joined the fast path (by their mode).
    pub connections_on: u64,
    pub connections_auto: u64,
    /// Times an `auto` connection reached the in-flight limit and took loopback TCP.
    pub limited: u64,
    /// What the sockmap probe found wrong with this kernel (see `sockmap_probe`); empty when
    /// it passed or has not run (it runs when a mode other than `off` is first asked for).
    pub kernel_defects: Vec<String>,
}

/// The fast path's mode and `auto`'s supervisor; one per attached agent.
pub struct FastPath {
    redirector: Arc<Redirector>,
    state: Mutex<State>,
    connections_on: AtomicU64,
    connections_auto: AtomicU64,
    limited: AtomicU64,
}

struct State {
    mode: FastPathMode,
    off_because: Option<String>,
    /// The sockmap probe's findings, once it ran.
    defects: Option<Vec<Defect>>,
}

impl FastPath {
    /// Sets `mode` in the kernel (`redirector` was loaded with the fast path off, so no
    /// connection gets a mode before this decided it), probing the kernel first unless the
    /// mode is `off`. Blocks for the probe (about half a second).
    pub fn start(
        redirector: Arc<Redirector>,
        mode: FastPathMode,
    ) -> Result<Arc<FastPath>, RedirectError> {
        let fast_path = Arc::new(FastPath {
            redirector,
            state: Mutex::new(State {
                mode,
                off_because: None,
                defects: None,
            }),
            connections_on: AtomicU64::new(0),
            connections_auto: AtomicU64::new(0),
            limited: AtomicU64::new(0),
        });
        fast_path.set(mode)?;
        Ok(fast_path)
    }

    /// Sets the mode for connections established from now on; clears an earlier `auto`
    /// switch-off. `auto` stays off on a kernel that fails the sockmap probe. May block for
    /// the probe.
    pub fn set(&self, mode: FastPathMode) -> Result<FastPathStatus, RedirectError> {
        let mut state = self.state.lock().expect("fast path lock");
        let defects = if mode == FastPathMode::Off {
            Vec::new()
        } else {
            self.probe(&mut state)
        };
        // For tests of `auto`'s own mechanics (its bound, its ordering) on a kernel that fails
        // the probe; never for production.
        let ignored = std::env::var_os(SKIP_PROBE_ENV).is_some();
        if ignored && mode == FastPathMode::Auto && !defects.is_empty() {
            warn!(defects = %defects.join("; "), "{SKIP_PROBE_ENV} is set: auto ignores what the sockmap probe found");
        }
        let off_because =
            (mode == FastPathMode::Auto && !defects.is_empty() && !ignored).then(|| {
                format!(
                    "this kernel fails the sockmap probe: {}",
                    defects.join("; ")
                )
            });
        let kernel = if off_because.is_some() {
            fast_path_mode::OFF
        } else {
            mode.kernel_value()
        };
        self.redirector.set_fast_path(kernel)?;
        let before = std::mem::replace(&mut state.mode, mode);
        match (&off_because, mode) {
            (Some(why), _) => {
                warn!(mode = %mode, why = %why, "fast path auto stays off: applications would notice it")
            }
            (None, FastPathMode::On) if !defects.is_empty() => warn!(
                defects = %defects.join("; "),
                "fast path on although this kernel's sockmap misbehaves: applications in the cgroup may notice"
            ),
            _ => {}
        }
        state.off_because = off_because;
        info!(from = %before, to = %mode, "fast path mode set; it applies to new connections");
        drop(state);
        Ok(self.status())
    }

    /// The probe's findings, running it the first time; a probe that cannot run counts as
    /// a defect (nothing says the fast path is safe then).
    fn probe(&self, state: &mut State) -> Vec<Defect> {
        state
            .defects
            .get_or_insert_with(|| match sockmap_probe::probe(&self.redirector) {
                Ok(defects) => {
                    info!(defects = ?defects, "sockmap probe done");
                    defects
                }
                Err(e) => {
                    warn!(error = %e, "the sockmap probe could not run; treating the fast path as unsafe");
                    vec![sockmap_probe::PROBE_FAILED]
                }
            })
            .clone()
    }

    pub fn status(&self) -> FastPathStatus {
        let state = self.state.lock().expect("fast path lock");
        let effective = if state.off_because.is_some() {
            FastPathMode::Off
        } else {
            state.mode
        };
        FastPathStatus {
            mode: state.mode.to_string(),
            effective: effective.to_string(),
            off_because: state.off_because.clone(),
            connections_on: self.connections_on.load(Relaxed),
            connections_auto: self.connections_auto.load(Relaxed),
            limited: self.limited.load(Relaxed),
            kernel_defects: state
                .defects
                .iter()
                .flatten()
                .map(|d| (*d).to_owned())
                .collect(),
        }
    }

    /// `auto` only: switches the fast path off for new connections and says why. Connections
    /// already on it stay (moving them could reorder their bytes); `rocks-agent fast-path auto`
    /// turns it on again.
    pub fn misbehaved(&self, why: String) {
        let mut state = self.state.lock().expect("fast path lock");
        if state.mode != FastPathMode::Auto || state.off_because.is_some() {
            return;
        }
        match self.redirector.set_fast_path(fast_path_mode::OFF) {
            Ok(()) => {
                warn!(why = %why, "fast path misbehaved: auto turned it off for new connections")
            }
            Err(e) => {
                warn!(why = %why, error = %e, "fast path misbehaved, and switching it off failed")
            }
        }
        state.off_because = Some(why);
    }

    /// The fast-path bookkeeping of the connection whose application end is `app`, if it
    /// joined the fast path (call once per accepted connection, before reading from it).
    pub fn connection(self: &Arc<Self>, app: SocketAddr) -> Option<FlowHandle> {
        let key = local_key(app);
        let flow = self.redirector.fast_flow(&key)?;
        match FastPathMode::from_kernel(flow.mode) {
            FastPathMode::On => self.connections_on.fetch_add(1, Relaxed),
            FastPathMode::Auto => self.connections_auto.fetch_add(1, Relaxed),
            FastPathMode::Off => return None,
        };
        Some(FlowHandle {
            fast_path: self.clone(),
            key,
            cookie: flow.cookie,
            app,
            read: 0,
        })
    }
}

/// The key the programs file a connection under: the application socket's port and family
/// (IPv4-mapped IPv6 counts as IPv4, as in `sock_ops`).
pub fn local_key(app: SocketAddr) -> LocalKey {
    let family = match app.ip() {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    };
    LocalKey {
        family,
        port: u32::from(app.port()),
    }
}

/// One fast-path connection, as its driver sees it: every read from the application socket
/// is reported, because in `auto` `sk_msg` redirects only while the agent has read all but a
/// bounded amount, and returns to sk_msg after a detour through TCP only once the agent has
/// read everything. Dropping it removes the connection's map entries and checks the
/// accounting.
pub struct FlowHandle {
    fast_path: Arc<FastPath>,
    key: LocalKey,
    cookie: u64,
    app: SocketAddr,
    read: u64,
}

impl FlowHandle {
    /// The agent read `n` more bytes from the application socket.
    pub fn read(&mut self, n: usize) {
        self.read += n as u64;
        // A failed write leaves the programs with a smaller count: they only redirect less.
        let _ = self
            .fast_path
            .redirector
            .set_fast_read(&self.key, self.cookie, self.read);
    }

    /// Reading the application socket failed. An application that aborts its connection
    /// gives a reset; anything else on a fast-path socket (ENOMEM above all: the kernel could
    /// not charge a redirected message) is the fast path misbehaving.
    pub fn read_failed(&self, e: &io::Error) {
        use io::ErrorKind::*;
        if !matches!(
            e.kind(),
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        ) {
            self.fast_path.misbehaved(format!(
                "reading fast-path connection {} failed: {e}",
                self.app
            ));
        }
    }
}

impl Drop for FlowHandle {
    fn drop(&mut self) {
        let Some(flow) = self
            .fast_path
            .redirector
            .end_fast_flow(&self.key, self.cookie)
        else {
            return;
        };
        self.fast_path
            .limited
            .fetch_add(u64::from(flow.limited), Relaxed);
        if let Some(why) = accounting_error(&flow, self.read) {
            self.fast_path
                .misbehaved(format!("fast-path connection {}: {why}", self.app));
        }
    }
}

/// Every byte the agent reads passed `sk_msg` first (which counts it in `sent`), so reading
/// more than was sent means bytes reached the agent unseen by the program, and the ordering
/// guarantee the in-flight bound rests on no longer holds.
fn accounting_error(flow: &FastFlow, read: u64) -> Option<String> {
    (read > flow.sent).then(|| {
        format!(
            "the agent read {read} bytes but sk_msg saw only {} sent",
            flow.sent
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_through_the_kernel_value_and_text() {
        for mode in [FastPathMode::On, FastPathMode::Off, FastPathMode::Auto] {
            assert_eq!(FastPathMode::from_kernel(mode.kernel_value()), mode);
            assert_eq!(mode.as_str().parse::<FastPathMode>(), Ok(mode));
        }
        assert!(
            "fast"
                .parse::<FastPathMode>()
                .unwrap_err()
                .contains("expected on, off or auto")
        );
    }

    #[test]
    fn keys_follow_sock_ops_normalization() {
        let v4 = local_key("127.0.0.1:40000".parse().unwrap());
        let mapped = local_key("[::ffff:127.0.0.1]:40000".parse().unwrap());
        let v6 = local_key("[::1]:40000".parse().unwrap());
        assert_eq!(
            v4,
            LocalKey {
                family: AF_INET,
                port: 40000
            }
        );
        assert_eq!(mapped, v4);
        assert_eq!(
            v6,
            LocalKey {
                family: AF_INET6,
                port: 40000
            }
        );
    }

    #[test]
    fn reading_more_than_was_sent_is_an_accounting_error() {
        let flow = FastFlow {
            sent: 100,
            ..FastFlow::default()
        };
        assert_eq!(accounting_error(&flow, 100), None);
        assert_eq!(
            accounting_error(&flow, 40),
            None,
            "a connection that ended early is fine"
        );
        assert!(
            accounting_error(&flow, 101)
                .unwrap()
                .contains("read 101 bytes but sk_msg saw only 100")
        );
    }
}
