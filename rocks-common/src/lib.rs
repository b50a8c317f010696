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

/// `SO_MARK` of the serving agent's transparent dials (bound to the remote client's address).
/// Distinct from [`AGENT_SOCKET_MARK`] because a routing rule sends everything carrying it to
/// the local host: the server program's replies to the client's address must come back to the
/// agent instead of leaving for the real network. The connect hooks skip it too.
pub const TRANSPARENT_MARK: u32 = 0x726f_6374; // "roct"

/// The port peers reach each other's agent on, unless configured otherwise.
pub const DEFAULT_PEER_PORT: u16 = 4470;
/// The loopback port redirected application connections land on, unless configured otherwise.
pub const DEFAULT_REDIRECT_PORT: u16 = 4471;

/// Names of the maps and programs in the eBPF object, so both sides agree on them.
pub mod names {
    pub const CONFIG: &str = "ROCKS_CONFIG";
    pub const POLICY: &str = "ROCKS_POLICY";
    pub const POLICY_ACTIVE: &str = "ROCKS_POLICY_ACTIVE";
    pub const POLICY_PORTS: &str = "ROCKS_POLICY_PORTS";
    pub const POLICY_CIDR4: &str = "ROCKS_POLICY_CIDR4";
    pub const POLICY_CIDR6: &str = "ROCKS_POLICY_CIDR6";
    pub const POLICY_CGROUPS: &str = "ROCKS_POLICY_CGROUPS";
    pub const NEGATIVE_CACHE: &str = "ROCKS_NEGATIVE_CACHE";
    pub const ORIG_BY_COOKIE: &str = "ROCKS_ORIG_BY_COOKIE";
    pub const ORIG_BY_LOCAL: &str = "ROCKS_ORIG_BY_LOCAL";
    pub const SOCKETS: &str = "ROCKS_SOCKETS";
    pub const STATS: &str = "ROCKS_STATS";
    pub const NETNS: &str = "ROCKS_NETNS";
    pub const CONNECT_BUDGET: &str = "ROCKS_CONNECT_BUDGET";
    pub const FAST_FLOWS: &str = "ROCKS_FAST_FLOWS";
    pub const FAST_READ: &str = "ROCKS_FAST_READ";

    pub const PROG_CONNECT4: &str = "rocks_connect4";
    pub const PROG_CONNECT6: &str = "rocks_connect6";
    pub const PROG_GETPEERNAME4: &str = "rocks_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "rocks_getpeername6";
    pub const PROG_SOCK_OPS: &str = "rocks_sock_ops";
    pub const PROG_SOCK_RELEASE: &str = "rocks_sock_release";
    pub const PROG_SK_MSG: &str = "rocks_sk_msg";
}

/// How the port entries of a policy generation are read ([`PolicyHeader::port_mode`]).
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

/// The policy (which connects are kept) lives in two generations, 0 and 1. Every policy entry
/// is keyed by its generation, and `ROCKS_POLICY_ACTIVE` names the one the connect hooks read.
/// The agent writes a new policy into the idle generation, flips the active one with a single
/// map write, waits until no program can still be reading the old one, then deletes it: a
/// connect sees the old policy or the new one, never a mix of both.
pub mod policy {
    /// Generations alternate between these two, which differ in one byte only, so even a
    /// byte-wise copy into the map cannot be seen half-done.
    pub const GENERATIONS: u32 = 2;
    /// Bits of [`super::PolicyHeader::flags`]: lookups the programs may skip when unset.
    pub const HAS_CIDR4: u32 = 1 << 0;
    pub const HAS_CIDR6: u32 = 1 << 1;
    pub const HAS_CGROUPS: u32 = 1 << 2;
    /// How many cgroup levels below the root the connect hooks look at for excluded
    /// ancestors; deeper levels are not checked (the agent refuses to exclude them).
    pub const MAX_CGROUP_LEVEL: u32 = 32;
    /// Map sizes: room for two whole generations, since the next one is written while the
    /// current one is still enforced.
    pub const MAX_PORTS: u32 = 2 * 2048;
    pub const MAX_CIDRS: u32 = 2 * 1024;
    pub const MAX_CGROUPS: u32 = 2 * 64;
}

/// One policy generation's settings (`ROCKS_POLICY`, indexed by generation).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyHeader {
    /// One of [`port_mode`].
    pub port_mode: u32,
    /// [`policy`] `HAS_*` bits.
    pub flags: u32,
}

/// Key of `ROCKS_POLICY_PORTS`: a destination port (host order) in a generation; the value
/// is a [`port_action`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyPortKey {
    pub generation: u32,
    pub port: u32,
}

/// Data of an `ROCKS_POLICY_CIDR4` LPM trie key: the generation takes the first 32 bits of the
/// prefix, so an entry's prefix length is 32 + the CIDR's. The address is in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCidr4 {
    pub generation: u32,
    pub addr: u32,
}

/// As [`PolicyCidr4`], for `ROCKS_POLICY_CIDR6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCidr6 {
    pub generation: u32,
    pub addr: [u32; 4],
}

/// Key of `ROCKS_POLICY_CGROUPS`: an excluded cgroup (its id is the inode number of its
/// directory) in a generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyCgroupKey {
    pub id: u64,
    pub generation: u32,
    /// Always 0: explicit, so the key has no padding bytes of undefined value.
    pub reserved: u32,
}

/// Indexes into the per-CPU statistics array.
pub mod stat {
    /// A connect was redirected to the agent.
    pub const REDIRECTED: u32 = 0;
    /// A connect was left alone because the destination is in the negative cache.
    pub const SKIPPED_NEGATIVE: u32 = 1;
    /// A connect was left alone by the port policy (`--ports`, `--exclude-ports`).
    pub const SKIPPED_POLICY: u32 = 2;
    /// A connect was left alone because it came from the agent itself.
    pub const SKIPPED_AGENT: u32 = 3;
    /// `sk_msg` redirected a message into the peer socket.
    pub const FAST_PATH_MSGS: u32 = 4;
    /// `sk_msg` found no peer socket and let the message take the normal path.
    pub const FAST_PATH_MISSES: u32 = 5;
    /// A connect was left alone because its destination is in an `--exclude-cidr` prefix.
    pub const SKIPPED_CIDR: u32 = 6;
    /// A connect was left alone because it came from an `--exclude-cgroup` cgroup.
    pub const SKIPPED_CGROUP: u32 = 7;
    /// A connect went direct because the agent carries `--max-connections` already.
    pub const SKIPPED_LIMIT: u32 = 8;
    /// `sk_msg` let an application message take loopback TCP on purpose (`auto`: too much in
    /// flight, or waiting for the agent to drain what took TCP before).
    pub const FAST_PATH_PASSED: u32 = 9;
    /// A fast-path connection reached [`super::FAST_PATH_IN_FLIGHT_LIMIT`] (`auto`).
    pub const FAST_PATH_LIMITED: u32 = 10;
    /// The sockhash refused a socket (MPTCP subflows, for one): that connection takes
    /// loopback TCP.
    pub const FAST_PATH_REFUSED: u32 = 11;
    /// Number of counters.
    pub const COUNT: u32 = 12;
}

/// Values of [`Config::fast_path`]: what `sock_ops` records for each new connection.
pub mod fast_path_mode {
    /// Loopback TCP only; sockets never enter the sockhash.
    pub const OFF: u32 = 0;
    /// Both directions redirected, unbounded (the receiver's window is bypassed).
    pub const ON: u32 = 1;
    /// Application to agent only, at most [`super::FAST_PATH_IN_FLIGHT_LIMIT`] bytes unread by
    /// the agent; the agent to the application always takes loopback TCP.
    pub const AUTO: u32 = 2;
}

/// `auto`: the most bytes `sk_msg` queues on the agent's socket that the agent has not read
/// yet. Past it the connection's messages take loopback TCP (whose window pushes back on the
/// application) until the agent has read everything sent so far.
pub const FAST_PATH_IN_FLIGHT_LIMIT: u64 = 4 << 20;

/// Per-connection fast-path state (`ROCKS_FAST_FLOWS`, keyed by the application socket's
/// [`LocalKey`]): created by `sock_ops` when the application socket is established, written
/// only by `sk_msg` on the application socket's sends (which the socket lock serializes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastFlow {
    /// The application socket's cookie: tells this connection's [`FastRead`] from one a
    /// previous connection on the same port left behind.
    pub cookie: u64,
    /// Every byte the application sent since it connected, whichever path it took.
    pub sent: u64,
    /// One of [`fast_path_mode`], fixed when the connection was established.
    pub mode: u32,
    /// Non-zero: messages take loopback TCP until the agent has read `sent` bytes. Once
    /// anything went by TCP, redirecting again before both queues are empty would let later
    /// bytes overtake earlier ones (the receiver reads its sk_msg queue first).
    pub passing: u32,
    /// How often this connection reached the in-flight limit.
    pub limited: u32,
    pub reserved: u32,
}

/// What the agent has read from a fast-path connection (`ROCKS_FAST_READ`, same key as
/// [`FastFlow`]), written by the agent after each read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FastRead {
    /// [`FastFlow::cookie`] of the connection this count belongs to.
    pub cookie: u64,
    pub read: u64,
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
    /// One of [`fast_path_mode`]: whether and how new connections use `sk_msg`.
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
    unsafe impl aya::Pod for super::FastFlow {}
    unsafe impl aya::Pod for super::FastRead {}
    unsafe impl aya::Pod for super::PolicyHeader {}
    unsafe impl aya::Pod for super::PolicyPortKey {}
    unsafe impl aya::Pod for super::PolicyCidr4 {}
    unsafe impl aya::Pod for super::PolicyCidr6 {}
    unsafe impl aya::Pod for super::PolicyCgroupKey {}
}
