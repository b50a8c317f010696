//! `sock_ops` and `sk_msg`: re-key each redirected connection's original destination by the
//! application socket's loopback port (what the agent sees on accept), and, with the fast path
//! on, put both ends of the loopback hop into a sockhash so `sk_msg` moves each `sendmsg`
//! straight into the other end's receive queue, skipping the TCP/IP stack.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
};
use rocks_common::{AF_INET, AF_INET6, LocalKey, SockKey, stat};

use crate::{
    addr::{is_loopback4, is_loopback6, is_v4_mapped, read_ip6},
    maps::{ORIG_BY_COOKIE, ORIG_BY_LOCAL, SOCKETS, agent_netns, config, count},
};

/// Normalizes a socket's view of a 4-tuple: IPv4-mapped IPv6 becomes IPv4, so an IPv6 app
/// socket talking to the agent's IPv4 listener and the agent's IPv4 socket agree on keys.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "one call per context type, all fields needed"
)]
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
        SockKey {
            family: AF_INET6,
            local_port,
            remote_port,
            local_addr: local6,
            remote_addr: remote6,
        }
    } else {
        let (l, r) = if family == AF_INET6 {
            (local6[3], remote6[3])
        } else {
            (local4, remote4)
        };
        SockKey {
            family: AF_INET,
            local_port,
            remote_port,
            local_addr: [l, 0, 0, 0],
            remote_addr: [r, 0, 0, 0],
        }
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
        let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
            return 0;
        };
        let local = LocalKey {
            family: key.family,
            port: key.local_port,
        };
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
