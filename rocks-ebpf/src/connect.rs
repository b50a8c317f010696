//! `connect4`/`connect6`: decide whether an application's TCP connect is kept; if so, remember
//! its original destination under the socket cookie and rewrite the connect to the agent's
//! loopback listener.
use aya_ebpf::{
    EbpfContext,
    bindings::BPF_ANY,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use rocks_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_MARK, Config, HostKey, IPPROTO_TCP, SockAddr, port_action,
    port_mode, stat,
};

use crate::{
    ALLOW,
    addr::{is_loopback4, is_loopback6, is_v4_mapped, read_ip6, write_ip6},
    maps::{NEGATIVE_CACHE, ORIG_BY_COOKIE, PORT_POLICY, agent_netns, config, count},
};

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
    let Some(config) = connect_candidate(&ctx) else {
        return ALLOW;
    };
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
    let host = HostKey {
        family: AF_INET,
        addr: [ip4, 0, 0, 0],
    };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    let orig = SockAddr {
        family: AF_INET,
        port: u32::from(port),
        addr: [ip4, 0, 0, 0],
    };
    if !remember(&ctx, &orig) {
        return ALLOW;
    }
    sa.user_ip4 = 0x7f00_0001u32.to_be();
    sa.user_port = u32::from((config.redirect_port as u16).to_be());
    count(stat::REDIRECTED);
    if config.log_redirects != 0 {
        debug!(
            &ctx,
            "redirect connect4 to {:i}:{}",
            u32::from_be(ip4),
            port
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn rocks_connect6(ctx: SockAddrContext) -> i32 {
    let Some(config) = connect_candidate(&ctx) else {
        return ALLOW;
    };
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
        HostKey {
            family: AF_INET,
            addr: [ip6[3], 0, 0, 0],
        }
    } else {
        HostKey {
            family: AF_INET6,
            addr: ip6,
        }
    };
    if negatively_cached(&host) {
        count(stat::SKIPPED_NEGATIVE);
        return ALLOW;
    }
    // Keep the address as the application wrote it, so getpeername6 gives back the same form.
    let orig = SockAddr {
        family: AF_INET6,
        port: u32::from(port),
        addr: ip6,
    };
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
