//! `getpeername4`/`getpeername6`: the application sees its original destination, not the
//! agent's loopback listener.
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use rocks_common::{AF_INET, AF_INET6};

use crate::{ALLOW, addr::write_ip6, maps::ORIG_BY_COOKIE};

#[inline(always)]
fn rewrite_peer(ctx: &SockAddrContext, want_family: u32) -> i32 {
    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain value read.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
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
