//! The rocks eBPF programs.
//!
//! - `connect4`/`connect6` (cgroup): decide whether an application's TCP connect is kept; if so,
//!   remember its original destination under the socket cookie and rewrite the destination to
//!   the agent's loopback listener.
//! - `sock_ops`: when a redirected socket is established, re-key its original destination by the
//!   socket's local port (what the agent sees as the peer address on accept), and, with the fast
//!   path on, put both ends of the loopback hop into the sockhash.
//! - `sk_msg`: redirect each `sendmsg` on a sockhash member straight into the ingress queue of
//!   the other end, so the loopback hop skips the TCP/IP stack.
//! - `getpeername4`/`getpeername6` (cgroup): make the application see its original destination.
//!
//! Every decision that leaves a connection alone returns "allow" unchanged: a bug or a full map
//! here must degrade to ordinary TCP, never to a failed connect.
#![no_std]
#![no_main]

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action},
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::debug;
use rocks_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_MARK, Config, HostKey, IPPROTO_TCP, LocalKey, SockAddr,
    SockKey, port_action, port_mode, stat,
};

/// Allow the syscall to proceed (cgroup sock_addr programs: 1 = allow).
const ALLOW: i32 = 1;

#[map(name = "ROCKS_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Agent network namespace cookie, kept apart from `Config` so `Config` stays all-u32.
#[map(name = "ROCKS_NETNS")]
static NETNS: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "ROCKS_PORT_POLICY")]
static PORT_POLICY: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Destination hosts known to have no agent, with the monotonic time (ns) the entry expires.
#[map(name = "ROCKS_NEGATIVE_CACHE")]
static NEGATIVE_CACHE: LruHashMap<HostKey, u64> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "ROCKS_ORIG_BY_COOKIE")]
static ORIG_BY_COOKIE: LruHashMap<u64, SockAddr> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ROCKS_ORIG_BY_LOCAL")]
static ORIG_BY_LOCAL: LruHashMap<LocalKey, SockAddr> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "ROCKS_SOCKETS")]
static SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

#[map(name = "ROCKS_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    let config = CONFIG.get(0)?;
    (config.enabled != 0).then_some(config)
}

#[inline(always)]
fn agent_netns() -> u64 {
    NETNS.get(0).copied().unwrap_or(0)
}

/// Reads the four IPv6 words of a context field one at a time: the verifier refuses the
/// memcpy/memmove the compiler would otherwise emit for an array copy out of or into ctx.
#[inline(always)]
fn read_ip6(field: &[u32; 4]) -> [u32; 4] {
    // SAFETY: `field` points into the kernel-provided context.
    unsafe {
        [
            core::ptr::read_volatile(&field[0]),
            core::ptr::read_volatile(&field[1]),
            core::ptr::read_volatile(&field[2]),
            core::ptr::read_volatile(&field[3]),
        ]
    }
}

#[inline(always)]
fn write_ip6(field: &mut [u32; 4], value: [u32; 4]) {
    // SAFETY: `field` points into the kernel-provided context; see `read_ip6`.
    unsafe {
        core::ptr::write_volatile(&mut field[0], value[0]);
        core::ptr::write_volatile(&mut field[1], value[1]);
        core::ptr::write_volatile(&mut field[2], value[2]);
        core::ptr::write_volatile(&mut field[3], value[3]);
    }
}

#[inline(always)]
fn is_loopback4(addr_be: u32) -> bool {
    let addr = u32::from_be(addr_be);
    addr >> 24 == 127 || addr == 0
}

#[inline(always)]
fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0xffffu32.to_be()
}

#[inline(always)]
fn is_loopback6(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && (addr[3] == 1u32.to_be() || addr[3] == 0)
}

/// The port policy and the well-known agent ports: true when `port` (host order) is kept.
#[inline(always)]
fn port_is_kept(config: &Config, port: u16) -> bool {
    if u32::from(port) == config.peer_port || u32::from(port) == config.redirect_port {
        return false;
    }
    // SAFETY: the value is a plain u8 read once.
    let action = unsafe { PORT_POLICY.get(&port) }.copied().unwrap_or(0);
    if config.port_mode == port_mode::ONLY_INCLUDED {
        action == port_action::INCLUDE
    } else {
        action != port_action::EXCLUDE
    }
}

/// True while `host` is in the negative cache (known to have no agent).
#[inline(always)]
fn negatively_cached(host: &HostKey) -> bool {
    // SAFETY: plain u64 read once.
    match unsafe { NEGATIVE_CACHE.get(host) } {
        Some(expiry) => {
            // SAFETY: helper without side effects.
            let now = unsafe { bpf_ktime_get_ns() };
            if now < *expiry {
                true
            } else {
                let _ = NEGATIVE_CACHE.remove(host);
                false
            }
        }
        None => false,
    }
}

/// Checks shared by connect4 and connect6; returns the config when the connect may be kept.
#[inline(always)]
fn connect_candidate(ctx: &SockAddrContext) -> Option<&'static Config> {
    let config = config()?;
    // SAFETY: ctx pointers are provided by the kernel for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return None;
    }
    // SAFETY: `sk` is always set for connect hooks.
    let mark = unsafe { (*sa.__bindgen_anon_1.sk).mark };
    if mark == AGENT_SOCKET_MARK {
        count(stat::SKIPPED_AGENT);
        return None;
    }
    // Only the agent's own network namespace has its loopback listener.
    // SAFETY: helper valid for sock_addr programs.
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != agent_netns() {
        return None;
    }
    Some(config)
}

/// Records the original destination and rewrites the connect to the agent.
#[inline(always)]
fn remember(ctx: &SockAddrContext, orig: &SockAddr) -> bool {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // A full map must mean "not kept", never a connection the agent cannot place.
    ORIG_BY_COOKIE.insert(&cookie, orig, BPF_ANY as u64).is_ok()
}

#[cgroup_sock_addr(connect4)]
pub fn rocks_connect4(ctx: SockAddrContext) -> i32 {
    let Some(config) = connect_candidate(&ctx) else { return ALLOW };
    // SAFETY: kernel-provided context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip4 = sa.user_ip4;
    let port = u16::from_be(sa.user_port as u16);
    if is_loopback4(ip4) {
        return ALLOW;
    }
    if !port_is_kept(config, port) {
        count(stat::SKIPPED_POLICY);
        return ALLOW;
    }
    let host = HostKey { family: AF_INET, addr: [ip4, 0, 0, 0] };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    let orig = SockAddr { family: AF_INET, port: u32::from(port), addr: [ip4, 0, 0, 0] };
    if !remember(&ctx, &orig) {
        return ALLOW;
    }
    sa.user_ip4 = 0x7f00_0001u32.to_be();
    sa.user_port = u32::from((config.redirect_port as u16).to_be());
    count(stat::REDIRECTED);
    if config.log_redirects != 0 {
        debug!(&ctx, "redirect connect4 to {:i}:{}", u32::from_be(ip4), port);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rocks_connect6(ctx: SockAddrContext) -> i32 {
    let Some(config) = connect_candidate(&ctx) else { return ALLOW };
    // SAFETY: kernel-provided context.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = read_ip6(&sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    let mapped = is_v4_mapped(&ip6);
    if (mapped && is_loopback4(ip6[3])) || (!mapped && is_loopback6(&ip6)) {
        return ALLOW;
    }
    if !port_is_kept(config, port) {
        count(stat::SKIPPED_POLICY);
        return ALLOW;
    }
    let host = if mapped {
        HostKey { family: AF_INET, addr: [ip6[3], 0, 0, 0] }
    } else {
        HostKey { family: AF_INET6, addr: ip6 }
    };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    // Keep the address as the application wrote it, so getpeername6 gives back the same form.
    let orig = SockAddr { family: AF_INET6, port: u32::from(port), addr: ip6 };
    if !remember(&ctx, &orig) {
        return ALLOW;
    }
    let agent = if mapped {
        [0, 0, 0xffffu32.to_be(), 0x7f00_0001u32.to_be()]
    } else {
        [0, 0, 0, 1u32.to_be()]
    };
    write_ip6(&mut sa.user_ip6, agent);
    sa.user_port = u32::from((config.redirect_port as u16).to_be());
    count(stat::REDIRECTED);
    if config.log_redirects != 0 {
        debug!(&ctx, "redirect connect6 port {}", port);
    }
    ALLOW
}

#[inline(always)]
fn rewrite_peer(ctx: &SockAddrContext, want_family: u32) -> i32 {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else { return ALLOW };
    if orig.family != want_family {
        return ALLOW;
    }
    // SAFETY: kernel-provided context.
    let sa = unsafe { &mut *ctx.sock_addr };
    if want_family == AF_INET {
        sa.user_ip4 = orig.addr[0];
    } else {
        let addr = orig.addr;
        write_ip6(&mut sa.user_ip6, addr);
    }
    sa.user_port = u32::from((orig.port as u16).to_be());
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn rocks_getpeername4(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, AF_INET)
}

#[cgroup_sock_addr(getpeername6)]
pub fn rocks_getpeername6(ctx: SockAddrContext) -> i32 {
    rewrite_peer(&ctx, AF_INET6)
}

/// Normalizes a socket's view of a 4-tuple: IPv4-mapped IPv6 becomes IPv4, so an IPv6 app
/// socket talking to the agent's IPv4 listener and the agent's IPv4 socket agree on keys.
#[inline(always)]
#[expect(clippy::too_many_arguments, reason = "one call per context type, all fields needed")]
fn sock_key(
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port_field: u32,
) -> SockKey {
    // sock_ops and sk_msg give local_port in host order and remote_port as the network-order
    // port shifted into the upper 16 bits.
    let remote_port = u32::from(u16::from_be((remote_port_field >> 16) as u16));
    if family == AF_INET6 && !(is_v4_mapped(&local6) && is_v4_mapped(&remote6)) {
        SockKey { family: AF_INET6, local_port, remote_port, local_addr: local6, remote_addr: remote6 }
    } else {
        let (l, r) = if family == AF_INET6 { (local6[3], remote6[3]) } else { (local4, remote4) };
        SockKey { family: AF_INET, local_port, remote_port, local_addr: [l, 0, 0, 0], remote_addr: [r, 0, 0, 0] }
    }
}

#[sock_ops]
pub fn rocks_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 0;
    }
    let Some(config) = config() else { return 0 };
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return 0;
    }
    // SAFETY: helper valid for sock_ops on the kernels we support (5.15+).
    if unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != agent_netns() {
        return 0;
    }
    let key = sock_key(
        family,
        ctx.local_ip4(),
        ctx.remote_ip4(),
        // SAFETY: kernel-provided context.
        read_ip6(unsafe { &(*ctx.ops).local_ip6 }),
        // SAFETY: kernel-provided context.
        read_ip6(unsafe { &(*ctx.ops).remote_ip6 }),
        ctx.local_port(),
        ctx.remote_port(),
    );
    let loopback = if key.family == AF_INET {
        is_loopback4(key.local_addr[0])
    } else {
        is_loopback6(&key.local_addr)
    };
    if !loopback {
        return 0;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // An application socket we redirected?
        if key.remote_port != config.redirect_port {
            return 0;
        }
        // SAFETY: helper valid for sock_ops.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: plain value read.
        let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else { return 0 };
        let local = LocalKey { family: key.family, port: key.local_port };
        let _ = ORIG_BY_LOCAL.insert(&local, orig, BPF_ANY as u64);
    } else if key.local_port != config.redirect_port {
        // Not the agent's end of a redirected connection.
        return 0;
    }
    if config.fast_path != 0 {
        let mut key = key;
        // SAFETY: the context is the kernel's bpf_sock_ops for this socket.
        let _ = SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64);
    }
    0
}

#[sk_msg]
pub fn rocks_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: kernel-provided context.
    let md = unsafe { &*ctx.msg };
    let me = sock_key(
        md.family,
        md.local_ip4,
        md.remote_ip4,
        read_ip6(&md.local_ip6),
        read_ip6(&md.remote_ip6),
        md.local_port,
        md.remote_port,
    );
    let mut peer = SockKey {
        family: me.family,
        local_port: me.remote_port,
        remote_port: me.local_port,
        local_addr: me.remote_addr,
        remote_addr: me.local_addr,
    };
    let verdict = SOCKETS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if verdict == i64::from(sk_action::SK_PASS) {
        count(stat::FAST_PATH_MSGS);
    } else {
        // The other end is not (or no longer) in the map: take the ordinary path.
        count(stat::FAST_PATH_MISSES);
    }
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
