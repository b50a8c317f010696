//! Loading the eBPF programs, attaching them to cgroups, and the maps the agent shares with them.
//!
//! The links and the state maps are pinned on bpffs under the run directory's pin directory
//! ([`crate::pin`], [`crate::links`]), so a restarted agent takes them over instead of
//! detaching and attaching again. [`Redirector::detach`] (the default at exit, and on drop)
//! detaches every program and removes the pins, so the cgroup is left exactly as it was found;
//! [`Redirector::keep`] leaves them for the next agent with redirection switched off.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupSockAddr, SkMsg, SockOps},
};
use rocks_common::{
    AF_INET, AF_INET6, Config, HostKey, LocalKey, SockAddr, SockKey, names, stat,
};
use tracing::{debug, info, warn};

use crate::cgroup::CgroupDir;
use crate::{
    links::{self, HeldLink, LinkError},
    pin::{PinDir, PinError},
};
use crate::{
    policy::{Policy, PolicyReport},
    policy_maps::{PolicyMapError, PolicyMaps},
};

/// The eBPF object built by `build.rs`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/rocks"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "this rocks-agent binary was built without its eBPF programs (bpf-linker was missing at build time); run `cargo xtask setup` and rebuild"
    )]
    NotBuilt,
    #[error("loading the eBPF object failed{1}")]
    Load(#[source] aya::EbpfError, &'static str),
    #[error("eBPF program {name} cannot be loaded{hint}")]
    Program { name: &'static str, #[source] source: aya::programs::ProgramError, hint: &'static str },
    #[error("eBPF map {name}")]
    Map { name: &'static str, #[source] source: aya::maps::MapError },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error(transparent)]
    Policy(#[from] PolicyMapError),
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14+)")]
    NetnsCookie(#[source] std::io::Error),
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Links(#[from] LinkError),
}

const PRIVILEGE_HINT: &str = " (loading and attaching eBPF needs root, or CAP_BPF and CAP_NET_ADMIN)";

fn privilege_hint(err: &(dyn std::error::Error + 'static)) -> &'static str {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            // EACCES is the verifier refusing a program, not a privilege problem.
            if io.raw_os_error() == Some(libc::EPERM) {
                return PRIVILEGE_HINT;
            }
        }
        let text = e.to_string();
        if text.contains("Operation not permitted") {
            return PRIVILEGE_HINT;
        }
        cur = e.source();
    }
    ""
}

/// What the programs are told at load time.
#[derive(Clone, Debug)]
pub struct RedirectOptions {
    pub redirect_port: u16,
    pub peer_port: u16,
    pub fast_path: crate::fastpath::FastPathMode,
    /// Which connects are kept (validated by `Policy::resolve`).
    pub policy: Policy,
    pub log_redirects: bool,
}

/// Counters kept by the programs, summed over CPUs.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KernelStats {
    pub redirected: u64,
    pub skipped_negative: u64,
    pub skipped_policy: u64,
    pub skipped_agent: u64,
    pub fast_path_msgs: u64,
    pub fast_path_misses: u64,
    /// Connects sent direct because the agent carried `--max-connections` already.
    pub skipped_limit: u64,
    /// Connects left alone because the destination is in an `--exclude-cidr` prefix.
    pub skipped_cidr: u64,
    /// Connects left alone because they came from an `--exclude-cgroup` cgroup.
    pub skipped_cgroup: u64,
    /// `auto`: application messages sent by loopback TCP on purpose (over the in-flight
    /// limit, or waiting for the agent to drain).
    #[serde(default)]
    pub fast_path_passed: u64,
    /// `auto`: times a connection reached the in-flight limit.
    #[serde(default)]
    pub fast_path_limited: u64,
    /// Sockets the sockhash refused (MPTCP subflows): those connections took loopback TCP.
    #[serde(default)]
    pub fast_path_refused: u64,
}

/// A negative cache entry as shown by `status`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct NegativeEntry {
    pub host: IpAddr,
    pub expires_in_secs: u64,
}

struct Maps {
    config: Array<MapData, Config>,
    orig_by_local: HashMap<MapData, LocalKey, SockAddr>,
    negative: HashMap<MapData, HostKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    // Held so the sockhash (and the sk_msg attachment to it) lives as long as we do.
    _sockets: SockHash<MapData, SockKey>,
}

/// The loaded programs, their attachments and maps.
pub struct Redirector {
    /// The programs and their links; `None` once detached. Maps were taken out of it and live
    /// on in `maps`, so lookups by connection tasks stay valid after detach.
    ebpf: Mutex<Option<Ebpf>>,
    maps: Mutex<Maps>,
    attached: Vec<PathBuf>,
    config: Config,
    logger: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Where the links and state maps are pinned.
    pins: PinDir,
    /// The links this agent holds; `None` once detached or kept for the next agent.
    links: Mutex<Option<Vec<HeldLink>>>,
    /// The policy maps and the policy in force; the lock also serializes live changes.
    policy: Mutex<PolicyMaps>,
}

/// The cookie of the network namespace this process runs in.
pub fn netns_cookie() -> Result<u64, RedirectError> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(RedirectError::NetnsCookie)?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length for SO_NETNS_COOKIE.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(RedirectError::NetnsCookie(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))?;
    T::try_from(map).map_err(|source| RedirectError::Map { name, source })
}

/// The maps whose contents are state worth keeping across an agent restart: the negative
/// cache (hosts known to have no agent), and the original destinations of connects redirected
/// while the agents change hands (old and new programs must record and find them in the same
/// place). They are pinned and taken over. Every other map is configuration that each agent
/// writes afresh from its own flags, so a restart with other flags cannot inherit stale values.
pub const PINNED_MAPS: [&str; 3] = [names::NEGATIVE_CACHE, names::ORIG_BY_COOKIE, names::ORIG_BY_LOCAL];

/// A pinned map whose shape (type, key and value sizes, capacity, flags) differs from this
/// binary's is unpinned, so the load creates it anew: its old contents cannot be read right.
fn drop_incompatible_maps(pins: &PinDir) {
    let object = match aya_obj::Object::parse(EBPF_OBJECT) {
        Ok(object) => object,
        Err(e) => {
            warn!(error = %e, "cannot parse the eBPF object to check pinned maps; starting them empty");
            for name in PINNED_MAPS {
                let _ = pins.unpin(&pins.map_path(name));
            }
            return;
        }
    };
    for name in PINNED_MAPS {
        let path = pins.map_path(name);
        let Ok(info) = aya::maps::MapInfo::from_pin(&path) else { continue };
        let Some(def) = object.maps.get(name) else { continue };
        let same = info.map_type().is_ok_and(|t| t as u32 == def.map_type())
            && info.key_size() == def.key_size()
            && info.value_size() == def.value_size()
            && info.max_entries() == def.max_entries()
            && info.map_flags() == def.map_flags();
        if !same {
            warn!(map = name, "the pinned map has another shape than this agent's; starting it empty");
            let _ = pins.unpin(&path);
        }
    }
}

fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

fn host_key(ip: IpAddr) -> HostKey {
    match ip {
        IpAddr::V4(v4) => HostKey { family: AF_INET, addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0] },
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => host_key(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                HostKey { family: AF_INET6, addr: [w(0), w(4), w(8), w(12)] }
            }
        },
    }
}

fn host_ip(key: &HostKey) -> IpAddr {
    if key.family == AF_INET {
        IpAddr::V4(Ipv4Addr::from(key.addr[0].to_ne_bytes()))
    } else {
        IpAddr::V6(Ipv6Addr::from(words_to_octets(&key.addr)))
    }
}

fn words_to_octets(words: &[u32; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// Converts an original destination recorded by the connect hooks into a socket address.
pub fn sock_addr_to_std(sa: &SockAddr) -> SocketAddr {
    let port = sa.port as u16;
    if sa.family == AF_INET {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(sa.addr[0].to_ne_bytes())), port)
    } else {
        let v6 = Ipv6Addr::from(words_to_octets(&sa.addr));
        // An IPv6 socket that dialed an IPv4-mapped address really talks IPv4.
        match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), port),
            None => SocketAddr::new(IpAddr::V6(v6), port),
        }
    }
}

impl Redirector {
    /// Loads the programs and fills the configuration, but attaches nothing and redirects
    /// nothing until [`Redirector::attach`] and [`Redirector::enable`].
    /// The state maps ([`PINNED_MAPS`]) come from `pins` when an earlier agent left them there.
    pub fn load(opts: &RedirectOptions, pins: &PinDir) -> Result<Self, RedirectError> {
        if EBPF_OBJECT.is_empty() {
            return Err(RedirectError::NotBuilt);
        }
        let netns = netns_cookie()?;
        let created = pins.prepare_guarded(netns)?;
        drop_incompatible_maps(pins);
        let mut loader = EbpfLoader::new();
        for name in PINNED_MAPS {
            loader.map_pin_path(name, pins.map_path(name));
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| { let hint = privilege_hint(&e); RedirectError::Load(e, hint) })?;
        let logger = start_logger(&mut ebpf);

        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6, names::PROG_GETPEERNAME4, names::PROG_GETPEERNAME6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| prog_err(name, source))?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        sock_ops.load().map_err(|source| prog_err(names::PROG_SOCK_OPS, source))?;
        let release: &mut aya::programs::CgroupSock = program(&mut ebpf, names::PROG_SOCK_RELEASE)?;
        release.load().map_err(|source| prog_err(names::PROG_SOCK_RELEASE, source))?;

        let sockets: SockHash<MapData, SockKey> = take(&mut ebpf, names::SOCKETS)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, names::PROG_SK_MSG)?;
        sk_msg.load().map_err(|source| prog_err(names::PROG_SK_MSG, source))?;
        sk_msg.attach(sockets.fd()).map_err(|source| prog_err(names::PROG_SK_MSG, source))?;

        let mut policy = PolicyMaps::take(&mut ebpf)?;
        policy.apply(opts.policy.clone())?;
        let mut netns_map: Array<MapData, u64> = take(&mut ebpf, names::NETNS)?;
        netns_map.set(0, netns, 0).map_err(|source| RedirectError::Map { name: names::NETNS, source })?;

        let config = Config {
            enabled: 0,
            redirect_port: u32::from(opts.redirect_port),
            peer_port: u32::from(opts.peer_port),
            fast_path: opts.fast_path.kernel_value(),
            log_redirects: u32::from(opts.log_redirects),
        };
        let mut config_map: Array<MapData, Config> = take(&mut ebpf, names::CONFIG)?;
        config_map.set(0, config, 0).map_err(|source| RedirectError::Map { name: names::CONFIG, source })?;

        let maps = Maps {
            config: config_map,
            orig_by_local: take(&mut ebpf, names::ORIG_BY_LOCAL)?,
            negative: take(&mut ebpf, names::NEGATIVE_CACHE)?,
            stats: take(&mut ebpf, names::STATS)?,
            _sockets: sockets,
        };
        debug!(netns_cookie = netns, "eBPF programs loaded");
        created.keep();
        Ok(Self {
            ebpf: Mutex::new(Some(ebpf)),
            maps: Mutex::new(maps),
            attached: Vec::new(),
            config,
            logger: Mutex::new(logger),
            policy: Mutex::new(policy),
            pins: pins.clone(),
            links: Mutex::new(Some(Vec::new())),
        })
    }

    /// Attaches the programs to each target cgroup, and `sock_ops` also to the agent's own
    /// cgroup (the agent's accepted sockets belong to it) unless a target already covers it.
    /// Links an earlier agent of this run directory pinned are taken over in place (see
    /// [`crate::links`]); its links on cgroups no longer given are detached.
    pub fn attach(&mut self, targets: &[CgroupDir], own: Option<&CgroupDir>) -> Result<(), RedirectError> {
        let guard = self.ebpf.lock().expect("ebpf lock");
        let ebpf = guard.as_ref().expect("attach before detach");
        let wanted = links::wanted(targets, own)?;
        let program_fd = |name: &'static str| {
            let fd = match ebpf.program(name)? {
                aya::programs::Program::CgroupSockAddr(p) => p.fd().ok()?,
                aya::programs::Program::SockOps(p) => p.fd().ok()?,
                aya::programs::Program::CgroupSock(p) => p.fd().ok()?,
                _ => return None,
            };
            Some(fd.as_fd())
        };
        let mut held = self.links.lock().expect("links lock");
        let held = held.as_mut().expect("attach before detach");
        let done = links::reconcile(&self.pins, &wanted, program_fd, held)?;
        for cg in targets {
            info!(cgroup = %cg.path.display(), "attached");
            self.attached.push(cg.path.clone());
        }
        if done.reused > 0 || done.removed > 0 {
            info!(
                reused = done.reused,
                attached = done.attached,
                removed = done.removed,
                pins = %self.pins.path().display(),
                "took over the links an earlier agent pinned"
            );
        }
        Ok(())
    }

    /// Stops redirecting, detaches every program from every cgroup and removes the pins
    /// (idempotent; a no-op after [`Redirector::keep`]).
    pub fn detach(&self) {
        let Some(held) = self.links.lock().expect("links lock").take() else { return };
        let _ = self.write_enabled(false);
        links::detach_held(held);
        // Also whatever an earlier agent pinned that was not taken over (a failed start).
        if let Err(e) = links::remove_all(&self.pins) {
            warn!(error = %e, pins = %self.pins.path().display(), "removing the pinned links and maps failed");
        }
        self.release_programs();
        for cg in &self.attached {
            info!(cgroup = %cg.display(), "detached");
        }
    }

    /// For a deliberate restart (`--on-exit keep`): switches redirection off, so connects go
    /// direct while no agent runs, and leaves the links and state maps pinned for the next
    /// agent of this run directory. `rocks-agent detach` removes them if none comes.
    pub fn keep(&self) {
        let Some(held) = self.links.lock().expect("links lock").take() else { return };
        let _ = self.write_enabled(false);
        let count = held.len();
        // Closing our fds leaves the pinned links attached.
        drop(held);
        self.release_programs();
        info!(links = count, pins = %self.pins.path().display(), "left the programs pinned and redirection off for the next agent");
    }

    /// Closes our handles on the programs and stops forwarding their log records. Programs
    /// that pinned links still run stay loaded.
    fn release_programs(&self) {
        let programs = self.ebpf.lock().expect("ebpf lock").take();
        drop(programs);
        if let Some(logger) = self.logger.lock().expect("logger lock").take() {
            logger.abort();
        }
    }

    /// Starts redirecting: call once the loopback listeners accept.
    pub fn enable(&mut self) -> Result<(), RedirectError> {
        self.write_enabled(true)
    }

    fn write_enabled(&self, enabled: bool) -> Result<(), RedirectError> {
        let config = Config { enabled: u32::from(enabled), ..self.config };
        let mut maps = self.maps.lock().expect("maps lock");
        maps.config.set(0, config, 0).map_err(|source| RedirectError::Map { name: names::CONFIG, source })
    }

    pub fn attached(&self) -> &[PathBuf] {
        &self.attached
    }

    /// The original destination of the redirected connection whose application end is `app`
    /// (the peer address the agent sees on accept). The entry is consumed.
    pub fn take_original_destination(&self, app: SocketAddr) -> Option<SocketAddr> {
        let family = match app.ip() {
            IpAddr::V4(_) => AF_INET,
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => AF_INET,
            IpAddr::V6(_) => AF_INET6,
        };
        let key = LocalKey { family, port: u32::from(app.port()) };
        let mut maps = self.maps.lock().expect("maps lock");
        let orig = maps.orig_by_local.get(&key, 0).ok()?;
        let _ = maps.orig_by_local.remove(&key);
        Some(sock_addr_to_std(&orig))
    }

    /// Puts `host` into the negative cache for `ttl`: connects to it are not redirected at all
    /// until then.
    pub fn add_negative(&self, host: IpAddr, ttl: Duration) {
        let expiry = monotonic_ns().saturating_add(ttl.as_nanos() as u64);
        let mut maps = self.maps.lock().expect("maps lock");
        if let Err(e) = maps.negative.insert(host_key(host), expiry, 0) {
            warn!(%host, error = %e, "negative cache full; later connects to this host will be probed again");
        }
    }

    pub fn negative_entries(&self) -> Vec<NegativeEntry> {
        let now = monotonic_ns();
        let maps = self.maps.lock().expect("maps lock");
        let mut out: Vec<NegativeEntry> = maps
            .negative
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, expiry)| *expiry > now)
            .map(|(k, expiry)| NegativeEntry { host: host_ip(&k), expires_in_secs: (expiry - now) / 1_000_000_000 })
            .collect();
        out.sort_by_key(|e| e.host);
        out
    }

    pub fn stats(&self) -> KernelStats {
        let maps = self.maps.lock().expect("maps lock");
        let sum = |i: u32| maps.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
        KernelStats {
            redirected: sum(stat::REDIRECTED),
            skipped_negative: sum(stat::SKIPPED_NEGATIVE),
            skipped_policy: sum(stat::SKIPPED_POLICY),
            skipped_agent: sum(stat::SKIPPED_AGENT),
            fast_path_msgs: sum(stat::FAST_PATH_MSGS),
            fast_path_misses: sum(stat::FAST_PATH_MISSES),
            skipped_limit: sum(stat::SKIPPED_LIMIT),
            skipped_cidr: sum(stat::SKIPPED_CIDR),
            skipped_cgroup: sum(stat::SKIPPED_CGROUP),
            fast_path_passed: sum(stat::FAST_PATH_PASSED),
            fast_path_limited: sum(stat::FAST_PATH_LIMITED),
            fast_path_refused: sum(stat::FAST_PATH_REFUSED),
        }
    }

    pub fn fast_path(&self) -> bool {
        self.config.fast_path != 0
    }

    /// Sets how many more connects connect4/6 may redirect before the agent accepts them (see
    /// `limit`); at 0 or below they send new connects direct. The map is looked up in the
    /// loaded object on each write; after detach there is nothing left to set.
    pub fn set_connect_budget(&self, budget: i64) -> Result<(), RedirectError> {
        let name = names::CONNECT_BUDGET;
        let mut guard = self.ebpf.lock().expect("ebpf lock");
        let Some(ebpf) = guard.as_mut() else { return Ok(()) };
        let map = ebpf.map_mut(name).ok_or(RedirectError::MissingMap(name))?;
        let mut value: Array<&mut MapData, i64> = Array::try_from(map).map_err(|source| RedirectError::Map { name, source })?;
        value.set(0, budget, 0).map_err(|source| RedirectError::Map { name, source })
    }

    /// The policy in force, as `status` shows it.
    pub fn policy(&self) -> PolicyReport {
        let maps = self.policy.lock().expect("policy lock");
        maps.current().report(maps.changes())
    }

    /// A live policy change: `change` turns the policy in force into the new one (or refuses),
    /// and the result is applied to the maps, all under one lock, so concurrent changes
    /// apply one after the other. Returns the policies before and after. Blocks for an RCU
    /// grace period (see `policy_maps`): call it off the async runtime.
    pub fn update_policy<E>(&self, change: impl FnOnce(&Policy) -> Result<Policy, E>) -> Result<(Policy, Policy), E>
    where
        E: From<PolicyMapError>,
    {
        let mut maps = self.policy.lock().expect("policy lock");
        let old = maps.current().clone();
        let new = change(&old)?;
        maps.apply(new.clone())?;
        Ok((old, new))
    }

    /// Sets the fast-path mode (`rocks_common::fast_path_mode`) `sock_ops` gives connections
    /// established from now on; live connections keep theirs.
    pub fn set_fast_path(&self, mode: u32) -> Result<(), RedirectError> {
        let mut maps = self.maps.lock().expect("maps lock");
        let err = |source| RedirectError::Map { name: names::CONFIG, source };
        let config = maps.config.get(&0, 0).map_err(err)?;
        maps.config.set(0, Config { fast_path: mode, ..config }, 0).map_err(err)
    }

    /// The fast-path state of the connection filed under `key`, if it joined the fast path.
    pub fn fast_flow(&self, key: &LocalKey) -> Option<rocks_common::FastFlow> {
        self.with_fast_map(names::FAST_FLOWS, |flows: HashMap<&mut MapData, LocalKey, rocks_common::FastFlow>| {
            flows.get(key, 0).ok()
        })
        .flatten()
    }

    /// Tells `sk_msg` how many bytes the agent has read from that connection.
    pub fn set_fast_read(&self, key: &LocalKey, cookie: u64, read: u64) -> Result<(), RedirectError> {
        let value = rocks_common::FastRead { cookie, read };
        self.with_fast_map(names::FAST_READ, |mut reads: HashMap<&mut MapData, LocalKey, rocks_common::FastRead>| {
            reads.insert(key, value, 0).map_err(|source| RedirectError::Map { name: names::FAST_READ, source })
        })
        .unwrap_or(Ok(()))
    }

    /// Removes that connection's fast-path entries, if they are still its own (`cookie`), and
    /// returns its final state.
    pub fn end_fast_flow(&self, key: &LocalKey, cookie: u64) -> Option<rocks_common::FastFlow> {
        let flow = self.fast_flow(key).filter(|f| f.cookie == cookie)?;
        self.with_fast_map(names::FAST_FLOWS, |mut m: HashMap<&mut MapData, LocalKey, rocks_common::FastFlow>| m.remove(key));
        self.with_fast_map(names::FAST_READ, |mut m: HashMap<&mut MapData, LocalKey, rocks_common::FastRead>| m.remove(key));
        Some(flow)
    }

    /// Puts a socket of the agent's own into the sockhash, for `sockmap_probe`.
    pub fn insert_probe_socket(&self, key: SockKey, socket: &impl AsRawFd) -> Result<(), RedirectError> {
        let mut maps = self.maps.lock().expect("maps lock");
        maps._sockets.insert(key, socket.as_raw_fd(), 0).map_err(|source| RedirectError::Map { name: names::SOCKETS, source })
    }

    pub fn remove_probe_socket(&self, key: &SockKey) {
        let _ = self.maps.lock().expect("maps lock")._sockets.remove(key);
    }

    /// Runs `f` on one of the fast path's maps, looked up in the loaded object (like
    /// `set_connect_budget`); `None` once detached, when nothing is redirected any more.
    fn with_fast_map<V: aya::Pod, R>(
        &self,
        name: &'static str,
        f: impl FnOnce(HashMap<&mut MapData, LocalKey, V>) -> R,
    ) -> Option<R> {
        let mut guard = self.ebpf.lock().expect("ebpf lock");
        let map = guard.as_mut()?.map_mut(name)?;
        HashMap::try_from(map).ok().map(f)
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::Program {
        name,
        source: aya::programs::ProgramError::UnexpectedProgramType,
        hint: " (program missing from the object)",
    })?;
    prog.try_into().map_err(|source| prog_err(name, source))
}

fn prog_err(name: &'static str, source: aya::programs::ProgramError) -> RedirectError {
    let hint = privilege_hint(&source);
    RedirectError::Program { name, source, hint }
}

/// Forwards aya-log records from the programs into our `tracing` logs. The logger must stay
/// alive and be polled, or the log map's fd closes.
fn start_logger(ebpf: &mut Ebpf) -> Option<tokio::task::JoinHandle<()>> {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(e) => {
            debug!(error = %e, "no eBPF log records will be forwarded");
            return None;
        }
    };
    let handle = tokio::runtime::Handle::try_current().ok()?;
    // SAFETY: the logger owns its ring buffer fd for its whole life and never swaps it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            debug!(error = %e, "cannot poll the eBPF log ring");
            return None;
        }
    };
    Some(handle.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else { return };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}

impl Drop for Redirector {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_map_encoding() {
        for ip in ["192.0.2.7", "2001:db8::5"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(host_ip(&host_key(ip)), ip);
        }
        let mapped: IpAddr = "::ffff:192.0.2.9".parse().unwrap();
        assert_eq!(host_ip(&host_key(mapped)), "192.0.2.9".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn original_destinations_decode() {
        let v4 = SockAddr { family: AF_INET, port: 22, addr: [u32::from_ne_bytes([192, 0, 2, 2]), 0, 0, 0] };
        assert_eq!(sock_addr_to_std(&v4), "192.0.2.2:22".parse().unwrap());
        let k = host_key("2001:db8::2".parse().unwrap());
        let v6 = SockAddr { family: AF_INET6, port: 443, addr: k.addr };
        assert_eq!(sock_addr_to_std(&v6), "[2001:db8::2]:443".parse().unwrap());
        let m = host_key(IpAddr::V6("::ffff:192.0.2.3".parse().unwrap()));
        let mapped = SockAddr { family: AF_INET6, port: 80, addr: [0, 0, 0xffffu32.to_be(), m.addr[0]] };
        assert_eq!(sock_addr_to_std(&mapped), "192.0.2.3:80".parse().unwrap());
    }
}
