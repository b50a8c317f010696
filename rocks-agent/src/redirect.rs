//! Loading the eBPF programs, attaching them to cgroups, and the maps the agent shares with them.
//!
//! Everything attached here is owned by [`Redirector`]: dropping it closes the links, which
//! detaches every program, so the cgroup is left exactly as it was found.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps},
};
use rocks_common::{
    AF_INET, AF_INET6, Config, HostKey, LocalKey, SockAddr, SockKey, names, port_action, port_mode, stat,
};
use tracing::{debug, info, warn};

use crate::cgroup::CgroupDir;

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
    #[error("cannot attach {name} to cgroup {cgroup}{hint}")]
    Attach {
        name: &'static str,
        cgroup: PathBuf,
        #[source]
        source: aya::programs::ProgramError,
        hint: &'static str,
    },
    #[error("eBPF map {name}")]
    Map { name: &'static str, #[source] source: aya::maps::MapError },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("cannot read this network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14+)")]
    NetnsCookie(#[source] std::io::Error),
}

/// aya attaches through BPF links on every kernel we support (5.7+). The kernel refuses any
/// attach flags on a cgroup link (EINVAL) and always attaches links as if BPF_F_ALLOW_MULTI were
/// given, so "no flags" is what gives multi-mode coexistence with systemd, Cilium and others.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

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
    pub fast_path: bool,
    /// When set, only these destination ports are kept.
    pub ports: Option<Vec<u16>>,
    pub exclude_ports: Vec<u16>,
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
    pub fn load(opts: &RedirectOptions) -> Result<Self, RedirectError> {
        if EBPF_OBJECT.is_empty() {
            return Err(RedirectError::NotBuilt);
        }
        let netns = netns_cookie()?;
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(|e| { let hint = privilege_hint(&e); RedirectError::Load(e, hint) })?;
        let logger = start_logger(&mut ebpf);

        for name in [names::PROG_CONNECT4, names::PROG_CONNECT6, names::PROG_GETPEERNAME4, names::PROG_GETPEERNAME6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(|source| prog_err(name, source))?;
        }
        let sock_ops: &mut SockOps = program(&mut ebpf, names::PROG_SOCK_OPS)?;
        sock_ops.load().map_err(|source| prog_err(names::PROG_SOCK_OPS, source))?;

        let sockets: SockHash<MapData, SockKey> = take(&mut ebpf, names::SOCKETS)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, names::PROG_SK_MSG)?;
        sk_msg.load().map_err(|source| prog_err(names::PROG_SK_MSG, source))?;
        sk_msg.attach(sockets.fd()).map_err(|source| prog_err(names::PROG_SK_MSG, source))?;

        let mut port_policy: HashMap<MapData, u16, u8> = take(&mut ebpf, names::PORT_POLICY)?;
        let mode = match &opts.ports {
            Some(ports) => {
                for p in ports {
                    port_policy.insert(p, port_action::INCLUDE, 0).map_err(|source| RedirectError::Map { name: names::PORT_POLICY, source })?;
                }
                port_mode::ONLY_INCLUDED
            }
            None => port_mode::ALL_EXCEPT_EXCLUDED,
        };
        for p in &opts.exclude_ports {
            port_policy.insert(p, port_action::EXCLUDE, 0).map_err(|source| RedirectError::Map { name: names::PORT_POLICY, source })?;
        }
        let mut netns_map: Array<MapData, u64> = take(&mut ebpf, names::NETNS)?;
        netns_map.set(0, netns, 0).map_err(|source| RedirectError::Map { name: names::NETNS, source })?;

        let config = Config {
            enabled: 0,
            redirect_port: u32::from(opts.redirect_port),
            peer_port: u32::from(opts.peer_port),
            port_mode: mode,
            fast_path: u32::from(opts.fast_path),
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
        Ok(Self { ebpf: Mutex::new(Some(ebpf)), maps: Mutex::new(maps), attached: Vec::new(), config, logger: Mutex::new(logger) })
    }

    /// Attaches the programs to each target cgroup, and `sock_ops` also to the agent's own
    /// cgroup (the agent's accepted sockets belong to it) unless a target already covers it.
    pub fn attach(&mut self, targets: &[CgroupDir], own: Option<&CgroupDir>) -> Result<(), RedirectError> {
        let mut guard = self.ebpf.lock().expect("ebpf lock");
        let ebpf = guard.as_mut().expect("attach before detach");
        for cg in targets {
            for name in [names::PROG_CONNECT4, names::PROG_CONNECT6, names::PROG_GETPEERNAME4, names::PROG_GETPEERNAME6] {
                let prog: &mut CgroupSockAddr = program(ebpf, name)?;
                prog.attach(&cg.file, ATTACH_MODE).map_err(|source| attach_err(name, &cg.path, source))?;
            }
            let covered_by_own = own.is_some_and(|own| cg.path.starts_with(&own.path));
            if !covered_by_own {
                attach_sock_ops(ebpf, cg)?;
            }
            info!(cgroup = %cg.path.display(), "attached");
            self.attached.push(cg.path.clone());
        }
        if let Some(own) = own {
            let covered_by_target = targets.iter().any(|t| own.path.starts_with(&t.path));
            if !covered_by_target {
                attach_sock_ops(ebpf, own)?;
                debug!(cgroup = %own.path.display(), "sock_ops attached to the agent's own cgroup");
            }
        }
        Ok(())
    }

    /// Stops redirecting and detaches every program from every cgroup (idempotent).
    pub fn detach(&self) {
        let _ = self.write_enabled(false);
        let programs = self.ebpf.lock().expect("ebpf lock").take();
        if let Some(programs) = programs {
            drop(programs);
            if let Some(logger) = self.logger.lock().expect("logger lock").take() {
                logger.abort();
            }
            for cg in &self.attached {
                info!(cgroup = %cg.display(), "detached");
            }
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
        }
    }

    pub fn fast_path(&self) -> bool {
        self.config.fast_path != 0
    }
}

fn attach_sock_ops(ebpf: &mut Ebpf, cg: &CgroupDir) -> Result<(), RedirectError> {
    let prog: &mut SockOps = program(ebpf, names::PROG_SOCK_OPS)?;
    prog.attach(&cg.file, ATTACH_MODE)
        .map_err(|source| attach_err(names::PROG_SOCK_OPS, &cg.path, source))?;
    Ok(())
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

fn attach_err(name: &'static str, cgroup: &Path, source: aya::programs::ProgramError) -> RedirectError {
    let hint = privilege_hint(&source);
    RedirectError::Attach { name, cgroup: cgroup.to_owned(), source, hint }
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
