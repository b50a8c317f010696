//! The agent's bounds on how many application connections it carries (`--max-connections`),
//! and the open-file limit they need.
//!
//! The limit is enforced in the kernel, before the application's connect is rewritten: the
//! agent keeps a budget in a map, `--max-connections` minus the connections it carries and
//! those waiting in its accept queues, and `connect4`/`connect6` take one from it for each
//! connect they redirect, sending the connect direct when none is left. An application never
//! sees a failed connect because the agent is full; it only loses keeping for the connections
//! made meanwhile. Counting in the kernel matters in a storm: thousands of connects can be
//! made before the agent has accepted the first, and a switch flipped by the agent would come
//! too late for all of them (measured: 2,000 connects at once, a limit of 256, and 786 of them
//! were redirected before the agent's flag was set).
use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
    time::Duration,
};

use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::registry::Registry;

/// The largest `--max-connections`: half the entries of the eBPF maps that hold redirected
/// connections' original destinations (65,536). Those maps evict their least recently used
/// entry when full; staying far below their size keeps the entries of live connections, whose
/// destination the agent still has to look up, from being the ones evicted.
pub const MAX_CONNECTIONS_CAP: u64 = 32_768;

/// Descriptors per connection carried at the limit: the application's socket and the
/// transport on this host, and as many again for connections this host serves for peers,
/// which are not limited.
const FDS_PER_CONNECTION: u64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("--max-connections must be between 1 and {MAX_CONNECTIONS_CAP}, not {0}")]
    OutOfRange(u64),
    #[error("cannot read the open-file limit (RLIMIT_NOFILE)")]
    Rlimit(#[source] std::io::Error),
}

/// Checks an explicit `--max-connections`.
pub fn check_max(max: u64) -> Result<u64, LimitError> {
    if (1..=MAX_CONNECTIONS_CAP).contains(&max) {
        Ok(max)
    } else {
        Err(LimitError::OutOfRange(max))
    }
}

/// The default `--max-connections` for an open-file limit of `nofile`.
pub fn default_max(nofile: u64) -> u64 {
    (nofile / FDS_PER_CONNECTION).clamp(1, MAX_CONNECTIONS_CAP)
}

/// Raises the soft open-file limit to the hard one (a connection storm needs a descriptor per
/// socket, and the usual soft limit of 1024 is far too low) and returns the limit now in force.
pub fn raise_nofile_limit() -> Result<u64, LimitError> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(LimitError::Rlimit(std::io::Error::last_os_error()));
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: valid pointer to an initialized rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = lim.rlim_cur,
                to = lim.rlim_max,
                "raised the open-file limit to its hard limit"
            );
            lim = raised;
        } else {
            warn!(limit = lim.rlim_cur, error = %std::io::Error::last_os_error(), "cannot raise the open-file limit");
        }
    }
    Ok(lim.rlim_cur)
}

/// Says, for a chosen maximum, whether the open-file limit is too low for it.
pub fn check_nofile(max: u64, nofile: u64) {
    if max.saturating_mul(FDS_PER_CONNECTION) > nofile {
        warn!(
            max_connections = max,
            open_file_limit = nofile,
            "the open-file limit is low for --max-connections: at the limit, accepts may fail with EMFILE \
             (raise LimitNOFILE, or ulimit -n, to at least {})",
            max * FDS_PER_CONNECTION
        );
    }
}

/// Where the limit takes effect: the connect hooks' budget of connects they may still
/// redirect.
pub trait RedirectSwitch: Send + Sync {
    fn set_budget(&self, budget: i64);
}

impl RedirectSwitch for crate::redirect::Redirector {
    fn set_budget(&self, budget: i64) {
        if let Err(e) = self.set_connect_budget(budget) {
            warn!(error = %e, budget, "cannot update the connect budget for --max-connections");
        }
    }
}

/// How many redirected connections wait in the agent's accept queues.
pub trait AcceptQueues: Send + Sync {
    fn queued(&self) -> u64;
    /// Lets go of the listeners (the agent is stopping); `queued` is 0 from then on.
    fn close(&self) {}
}

/// The agent's redirect listeners, asked through `TCP_INFO`: for a listening socket the kernel
/// reports the length of its accept queue in `tcpi_unacked`.
pub struct ListenerQueues(Mutex<Vec<OwnedFd>>);

impl ListenerQueues {
    /// Keeps a duplicate of each listener's descriptor (the listeners move into their tasks).
    /// A duplicate keeps its socket listening: [`AcceptQueues::close`] must come when the
    /// listeners are meant to close.
    pub fn new<'a>(listeners: impl IntoIterator<Item = &'a TcpListener>) -> std::io::Result<Self> {
        let fds = listeners
            .into_iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect::<Result<_, _>>()?;
        Ok(ListenerQueues(Mutex::new(fds)))
    }
}

impl AcceptQueues for ListenerQueues {
    fn close(&self) {
        self.0.lock().expect("listener fds lock").clear();
    }

    fn queued(&self) -> u64 {
        self.0
            .lock()
            .expect("listener fds lock")
            .iter()
            .map(|fd| {
                // SAFETY: tcp_info is plain data; zeroed is a valid value.
                let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
                // SAFETY: valid socket fd, out-pointer and length.
                let rc = unsafe {
                    libc::getsockopt(
                        fd.as_raw_fd(),
                        libc::IPPROTO_TCP,
                        libc::TCP_INFO,
                        (&raw mut info).cast(),
                        &mut len,
                    )
                };
                if rc == 0 {
                    u64::from(info.tcpi_unacked)
                } else {
                    0
                }
            })
            .sum()
    }
}

/// Counts the application connections the agent carries, and keeps the connect hooks' budget
/// at `max` minus those and the ones waiting to be accepted.
pub struct ConnectionLimit {
    max: u64,
    /// The "below the limit again" line is logged once the count is down to this, so a count
    /// hovering at the limit does not log on every connection.
    resume_at: u64,
    state: Mutex<State>,
    switch: Arc<dyn RedirectSwitch>,
    queues: Box<dyn AcceptQueues>,
    /// Counts the episodes (`connection_limit_reached` in `status`).
    registry: Arc<Registry>,
}

#[derive(Default)]
struct State {
    open: u64,
    at_limit: bool,
}

/// One carried connection; dropping it frees its place.
pub struct Slot(Arc<ConnectionLimit>);

impl ConnectionLimit {
    /// Starts with the whole budget (nothing is open yet).
    pub fn new(
        max: u64,
        switch: Arc<dyn RedirectSwitch>,
        queues: Box<dyn AcceptQueues>,
        registry: Arc<Registry>,
    ) -> Arc<Self> {
        let resume_at = (max - max / 10).min(max - 1);
        let limit = Arc::new(ConnectionLimit {
            max,
            resume_at,
            state: Mutex::default(),
            switch,
            queues,
            registry,
        });
        limit.update(&mut limit.state.lock().expect("limit lock"));
        limit
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// Counts a connection the agent accepted.
    pub fn acquire(self: &Arc<Self>) -> Slot {
        let mut st = self.state.lock().expect("limit lock");
        st.open += 1;
        self.update(&mut st);
        Slot(self.clone())
    }

    /// Rewrites the budget now. Connects the hooks counted but that never reached the agent
    /// (refused by another program after ours, say) leave the kernel's budget short until the
    /// next rewrite: [`ConnectionLimit::spawn_refresh`] does one every second.
    pub fn refresh(&self) {
        self.update(&mut self.state.lock().expect("limit lock"));
    }

    /// Refreshes the budget every `period` while the limit lives.
    pub fn spawn_refresh(self: &Arc<Self>, period: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(limit) => limit.refresh(),
                    None => return,
                }
            }
        });
    }

    /// Lets go of the listeners: call when they are to close (their descriptors are shared).
    pub fn close_listeners(&self) {
        self.queues.close();
    }

    /// (connections open now, whether the limit is in force now).
    pub fn snapshot(&self) -> (u64, bool) {
        let st = self.state.lock().expect("limit lock");
        (st.open, st.at_limit)
    }

    fn release(&self) {
        let mut st = self.state.lock().expect("limit lock");
        st.open -= 1;
        self.update(&mut st);
    }

    /// Under the state lock, so budget writes land in the order of the counts they reflect.
    fn update(&self, st: &mut State) {
        let pending = st.open + self.queues.queued();
        let budget = self.max as i64 - pending as i64;
        self.switch.set_budget(budget);
        if budget <= 0 && !st.at_limit {
            st.at_limit = true;
            self.registry
                .counters
                .connection_limit_reached
                .fetch_add(1, Relaxed);
            warn!(
                max_connections = self.max,
                "connection limit reached: new connections from the cgroups go direct (not kept) \
                 until {} or fewer are open",
                self.resume_at
            );
        } else if st.at_limit && pending <= self.resume_at {
            st.at_limit = false;
            info!(
                open = st.open,
                max_connections = self.max,
                "below the connection limit again: new connections are kept"
            );
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.release();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};

    use super::*;

    /// The kernel's side, as far as the limit sees it: the last budget written.
    #[derive(Default)]
    struct Kernel {
        budget: AtomicI64,
    }

    impl RedirectSwitch for Kernel {
        fn set_budget(&self, budget: i64) {
            self.budget.store(budget, SeqCst);
        }
    }

    /// Accept queues whose length the test sets.
    #[derive(Clone, Default)]
    struct Queues(Arc<AtomicU64>);

    impl AcceptQueues for Queues {
        fn queued(&self) -> u64 {
            self.0.load(SeqCst)
        }
    }

    fn limit(max: u64) -> (Arc<ConnectionLimit>, Arc<Kernel>, Queues, Arc<Registry>) {
        let (kernel, queues, reg) = (
            Arc::new(Kernel::default()),
            Queues::default(),
            Arc::new(Registry::default()),
        );
        let limit =
            ConnectionLimit::new(max, kernel.clone(), Box::new(queues.clone()), reg.clone());
        (limit, kernel, queues, reg)
    }

    #[test]
    fn the_budget_is_the_limit_minus_what_is_open_and_queued() {
        let (limit, kernel, queues, reg) = limit(5);
        assert_eq!(kernel.budget.load(SeqCst), 5, "the whole budget at start");
        let mut slots: Vec<Slot> = (0..3).map(|_| limit.acquire()).collect();
        assert_eq!(kernel.budget.load(SeqCst), 2);
        // A storm: two more wait to be accepted, the kernel took them from the budget.
        queues.0.store(2, SeqCst);
        limit.refresh();
        assert_eq!(kernel.budget.load(SeqCst), 0);
        assert_eq!(limit.snapshot(), (3, true));
        assert_eq!(reg.counters().connection_limit_reached, 1);
        // Accepting one moves it from the queue to the open ones: still nothing left.
        queues.0.store(1, SeqCst);
        slots.push(limit.acquire());
        queues.0.store(0, SeqCst);
        slots.push(limit.acquire());
        assert_eq!(kernel.budget.load(SeqCst), 0);
        // Over the limit (connects overdrawn by a CPU each): a negative budget, no new episode.
        slots.push(limit.acquire());
        assert_eq!(kernel.budget.load(SeqCst), -1);
        assert_eq!(reg.counters().connection_limit_reached, 1);
        slots.truncate(4);
        assert_eq!(limit.snapshot(), (4, false), "4 open: below the limit");
        assert_eq!(kernel.budget.load(SeqCst), 1);
        slots.push(limit.acquire());
        assert_eq!(
            reg.counters().connection_limit_reached,
            2,
            "a second episode"
        );
    }

    #[test]
    fn a_large_limit_says_it_is_below_again_at_ninety_percent() {
        let (limit, kernel, _, _) = limit(100);
        let mut slots: Vec<Slot> = (0..100).map(|_| limit.acquire()).collect();
        assert!(limit.snapshot().1);
        slots.truncate(91);
        assert!(limit.snapshot().1, "91 open");
        assert_eq!(
            kernel.budget.load(SeqCst),
            9,
            "the budget follows every change"
        );
        slots.pop();
        assert!(!limit.snapshot().1, "90 open");
    }

    #[test]
    fn a_limit_of_one() {
        let (limit, kernel, _, _) = limit(1);
        let s = limit.acquire();
        assert_eq!(kernel.budget.load(SeqCst), 0);
        drop(s);
        assert_eq!(kernel.budget.load(SeqCst), 1);
        assert!(!limit.snapshot().1);
    }

    #[test]
    fn bounds() {
        assert!(check_max(0).is_err());
        assert_eq!(check_max(5).unwrap(), 5);
        assert!(
            check_max(MAX_CONNECTIONS_CAP + 1)
                .unwrap_err()
                .to_string()
                .contains("between 1 and 32768")
        );
        assert_eq!(default_max(1024), 256);
        assert_eq!(default_max(20_000), 5_000);
        assert_eq!(default_max(1 << 20), MAX_CONNECTIONS_CAP);
    }
}
