//! `sock_release`: forgets a socket's original destination when the socket goes away.
//!
//! `connect4`/`connect6` record every redirected connect's destination under its socket cookie,
//! and `getpeername` reads it for the socket's whole life, so nothing earlier may delete it.
//! Without this program the entries would only leave the (LRU) map by eviction: after some
//! 65,000 later connects, a long-lived connection's entry was evicted and its `getpeername()`
//! showed the agent's loopback listener (measured: 72,000 connects during one connection).
//! Releasing the entry with the socket keeps the map down to the sockets that exist, connects
//! refused after ours (by another program) included.
use aya_ebpf::{
    EbpfContext, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock,
    programs::SockContext,
};

use crate::maps::ORIG_BY_COOKIE;

#[cgroup_sock(sock_release)]
pub fn rocks_sock_release(ctx: SockContext) -> i32 {
    // SAFETY: helper valid for cgroup sock programs (Linux 5.8+).
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // Most sockets were never redirected: nothing to remove then.
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    1
}
