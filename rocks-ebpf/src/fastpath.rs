//! `sock_ops` and `sk_msg`: re-key each redirected connection's original destination by the
//! application socket's loopback port (what the agent sees on accept), and, with the fast path
//! on or auto, put both ends of the loopback hop into a sockhash so `sk_msg` moves
//! `sendmsg` data straight into the other end's receive queue, skipping the TCP/IP stack.
//!
//! Redirected data bypasses the receiver's TCP window, so the programs bound it where they
//! can (see `rocks_common::FastFlow`): in `auto`, only the application's sends are redirected,
//! and only while the agent has read all but `FAST_PATH_IN_FLIGHT_LIMIT` of them; the agent's
//! sends take loopback TCP, because nothing here sees how much the application has read.
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
use rocks_common::{
    AF_INET, AF_INET6, FAST_PATH_IN_FLIGHT_LIMIT, FastFlow, LocalKey, SockKey, fast_path_mode, stat,
};

use crate::{
    addr::{is_loopback4, is_loopback6, is_v4_mapped, read_ip6},
    maps::{
        FAST_FLOWS, FAST_READ, ORIG_BY_COOKIE, ORIG_BY_LOCAL, SOCKETS, agent_netns, config, count,
    },
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
        if config.fast_path == fast_path_mode::OFF {
            // A connection of an earlier mode may have left its entry behind (the agent
            // removes them, but not if it died): this connection must not inherit it.
            let _ = FAST_FLOWS.remove(&local);
            return 0;
        }
        // The mode is fixed per connection here: a switch later applies to new connections
        // only, and both ends follow the application end's entry.
        let flow = FastFlow {
            cookie,
            mode: config.fast_path,
            ..FastFlow::default()
        };
        if FAST_FLOWS.insert(&local, &flow, BPF_ANY as u64).is_err() {
            return 0;
        }
        let mut key = key;
        // SAFETY: the context is the kernel's bpf_sock_ops for this socket.
        if SOCKETS
            .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
            .is_err()
        {
            // The sockhash refuses some sockets (MPTCP subflows, which carry a ULP): the
            // connection takes loopback TCP, and the agent's end must not be redirected to.
            let _ = FAST_FLOWS.remove(&local);
            count(stat::FAST_PATH_REFUSED);
        }
    } else if key.local_port == config.redirect_port {
        // The agent's end: joins the sockhash only if the application's end did.
        let app = LocalKey {
            family: key.family,
            port: key.remote_port,
        };
        // SAFETY: plain value read.
        if unsafe { FAST_FLOWS.get(&app) }.is_none() {
            return 0;
        }
        let mut key = key;
        // SAFETY: the context is the kernel's bpf_sock_ops for this socket.
        if SOCKETS
            .update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)
            .is_err()
        {
            count(stat::FAST_PATH_REFUSED);
        }
    }
    0
}

#[sk_msg]
pub fn rocks_sk_msg(ctx: SkMsgContext) -> u32 {
    let Some(config) = config() else {
        return sk_action::SK_PASS;
    };
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
    let from_app = me.remote_port == config.redirect_port;
    let app = LocalKey {
        family: me.family,
        port: if from_app {
            me.local_port
        } else {
            me.remote_port
        },
    };
    let Some(flow) = FAST_FLOWS.get_ptr_mut(&app) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: a map value; only this socket's sends write it, under the socket lock.
    let flow = unsafe { &mut *flow };
    if !from_app {
        // The agent's sends: redirected only with the fast path on. Nothing bounds how much
        // then queues on the application's socket.
        if flow.mode == fast_path_mode::ON {
            redirect(&ctx, &me);
        }
        return sk_action::SK_PASS;
    }
    let size = u64::from(md.size);
    // SAFETY: plain value read; a stale (smaller) count only makes us more careful, and a
    // count of an earlier connection on this port does not count.
    let read = match unsafe { FAST_READ.get(&app) } {
        Some(r) if r.cookie == flow.cookie => r.read,
        _ => 0,
    };
    let redirect_it = if flow.passing != 0 {
        // Back to sk_msg only once the agent has read everything sent so far: both of its
        // queues are empty then, so nothing sent later can overtake anything sent earlier.
        if read >= flow.sent {
            flow.passing = 0;
            true
        } else {
            false
        }
    } else if flow.mode == fast_path_mode::AUTO
        && flow.sent.saturating_sub(read).saturating_add(size) > FAST_PATH_IN_FLIGHT_LIMIT
    {
        // The agent is not keeping up (or stopped reading: its replay buffer is full). Loopback
        // TCP from here on, so the agent's receive window pushes back on the application.
        flow.passing = 1;
        flow.limited = flow.limited.wrapping_add(1);
        count(stat::FAST_PATH_LIMITED);
        false
    } else {
        true
    };
    flow.sent = flow.sent.wrapping_add(size);
    if !redirect_it {
        count(stat::FAST_PATH_PASSED);
        return sk_action::SK_PASS;
    }
    if !redirect(&ctx, &me) {
        // Took TCP after all (the agent's end is not in the sockhash yet, or no longer):
        // wait for it to drain like any other pass.
        flow.passing = 1;
    }
    sk_action::SK_PASS
}

/// Redirects the message into the other end's receive queue if that end is in the sockhash;
/// false when it is not, and the message takes the ordinary path (the caller returns
/// `SK_PASS` either way).
#[inline(always)]
fn redirect(ctx: &SkMsgContext, me: &SockKey) -> bool {
    let mut peer = SockKey {
        family: me.family,
        local_port: me.remote_port,
        remote_port: me.local_port,
        local_addr: me.remote_addr,
        remote_addr: me.local_addr,
    };
    let verdict = SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS));
    if verdict == i64::from(sk_action::SK_PASS) {
        count(stat::FAST_PATH_MSGS);
        true
    } else {
        // The other end is not (or no longer) in the map: take the ordinary path.
        count(stat::FAST_PATH_MISSES);
        false
    }
}
