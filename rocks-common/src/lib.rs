//! Types shared by the eBPF programs (`rocks-ebpf`) and the agent (`rocks-agent`).
//!
//! Every type here is `#[repr(C)]`, `Copy` and free of padding holes that the verifier would
//! refuse to read, because the same bytes are written by one side and read by the other through
//! BPF maps. Addresses are kept exactly as the kernel hands them to eBPF programs: IPv4 and
//! IPv6 words in network byte order, so neither side converts on the hot path.
#![no_std]

/// `AF_INET`, as the kernel reports it in `bpf_sock_addr.user_family`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;

/// `SO_MARK` value the agent puts on every socket it opens itself. The connect hooks never
/// redirect a socket carrying it, so the agent's own connections (to peer agents, or direct
/// fallbacks) are never looped back into the agent.
pub const AGENT_SOCKET_MARK: u32 = 0x726f_636b; // "rock"

/// The port peers reach each other's agent on, unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 4470;
/// The loopback port redirected application connections land on, unless configured otherwise.
pub const DEFAULT_REDIRECT_PORT: u16 = 4471;

/// Names of the maps and programs in the eBPF object, so both sides agree on them.
pub mod names {
    pub const CONFIG: &str = "ROCKS_CONFIG";
    pub const PORT_POLICY: &str = "ROCKS_PORT_POLICY";
    pub const NEGATIVE_CACHE: &str = "ROCKS_NEGATIVE_CACHE";
    pub const ORIG_BY_COOKIE: &str = "ROCKS_ORIG_BY_COOKIE";
    pub const ORIG_BY_LOCAL: &str = "ROCKS_ORIG_BY_LOCAL";
    pub const SOCKETS: &str = "ROCKS_SOCKETS";
    pub const STATS: &str = "ROCKS_STATS";
    pub const NETNS: &str = "ROCKS_NETNS";

    pub const PROG_CONNECT4: &str = "rocks_connect4";
    pub const PROG_CONNECT6: &str = "rocks_connect6";
    pub const PROG_GETPEERNAME4: &str = "rocks_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "rocks_getpeername6";
    pub const PROG_SOCK_OPS: &str = "rocks_sock_ops";
    pub const PROG_SK_MSG: &str = "rocks_sk_msg";
}

/// How the port policy map is read.
pub mod port_mode {
    /// Every destination port is kept except those marked `EXCLUDE` in the policy map.
    pub const ALL_EXCEPT_EXCLUDED: u32 = 0;
    /// Only ports marked `INCLUDE` in the policy map are kept.
    pub const ONLY_INCLUDED: u32 = 1;
}

/// Values of the port policy map.
pub mod port_action {
    pub const INCLUDE: u8 = 1;
    pub const EXCLUDE: u8 = 2;
}

/// Indexes into the per-CPU statistics array.
pub mod stat {
    /// A connect was redirected to the agent.
    pub const REDIRECTED: u32 = 0;
    /// A connect was left alone because the destination is in the negative cache.
    pub const SKIPPED_NEGATIVE: u32 = 1;
    /// A connect was left alone by the port policy.
    pub const SKIPPED_POLICY: u32 = 2;
    /// A connect was left alone because it came from the agent itself.
    pub const SKIPPED_AGENT: u32 = 3;
    /// `sk_msg` redirected a message into the peer socket.
    pub const FAST_PATH_MSGS: u32 = 4;
    /// `sk_msg` found no peer socket and let the message take the normal path.
    pub const FAST_PATH_MISSES: u32 = 5;
    /// Number of counters.
    pub const COUNT: u32 = 6;
}

/// Global switches, in a one-element array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Non-zero once the agent's loopback listeners accept; until then nothing is redirected.
    pub enabled: u32,
    /// The agent's loopback listener port, host byte order.
    pub redirect_port: u32,
    /// The peer agent port (host byte order); connects to it are never redirected.
    pub peer_port: u32,
    /// One of [`port_mode`].
    pub port_mode: u32,
    /// Non-zero: put redirected sockets into the sockhash so `sk_msg` short-cuts loopback.
    pub fast_path: u32,
    /// Non-zero: emit a debug log record for each redirect.
    pub log_redirects: u32,
}

/// A socket address as eBPF sees it. `addr` holds the IPv4 address in `addr[0]` (network
/// order) or the IPv6 address in all four words (network order); `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub family: u32,
    pub port: u32,
    pub addr: [u32; 4],
}

/// Key of the negative cache: a destination host (not a port), since an agent serves a
/// whole host.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostKey {
    pub family: u32,
    pub addr: [u32; 4],
}

/// Key under which `sock_ops` records an application socket's original destination: the
/// application socket's local (loopback) port and whether the connection is IPv6. The agent
/// sees exactly this as the peer address of the connection it accepts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalKey {
    /// `AF_INET` for IPv4 connections (including IPv4-mapped IPv6 sockets), `AF_INET6` otherwise.
    pub family: u32,
    /// Host byte order.
    pub port: u32,
}

/// Key of the sockhash: a TCP 4-tuple seen from one socket. `sk_msg` looks up the other end of
/// a loopback connection by swapping local and remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub family: u32,
    pub local_port: u32,
    pub remote_port: u32,
    pub local_addr: [u32; 4],
    pub remote_addr: [u32; 4],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C) structs of plain integers with no padding.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::HostKey {}
    unsafe impl aya::Pod for super::LocalKey {}
    unsafe impl aya::Pod for super::SockKey {}
}
