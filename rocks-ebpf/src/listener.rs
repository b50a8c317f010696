//! Is the agent there? A connect is only rewritten to the agent's loopback listener while that
//! listener exists. The links and maps are pinned so they outlive the agent; if it dies without
//! detaching (SIGKILL, the OOM killer), redirecting to a port nobody listens on would refuse
//! every connect in the cgroup. With this check the application connects directly instead,
//! until the next agent starts listening.
use aya_ebpf::{
    EbpfContext,
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    helpers::generated::{bpf_sk_lookup_tcp, bpf_sk_release},
    programs::SockAddrContext,
};

/// `BPF_F_CURRENT_NETNS`: look the socket up in the connecting socket's network namespace.
const CURRENT_NETNS: u64 = u64::MAX;

/// Looks the tuple up (established first, then listeners) and releases what it found: the
/// verifier insists on the release, and we only want to know whether something is there.
#[inline(always)]
fn lookup(ctx: &SockAddrContext, tuple: &mut bpf_sock_tuple, size: usize) -> bool {
    // SAFETY: helper valid for cgroup sock_addr programs (Linux 5.2+); `tuple` is on our stack
    // and `size` is the size of the union member we filled in.
    let sk = unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), tuple, size as u32, CURRENT_NETNS, 0) };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` is the non-null socket the lookup acquired.
    unsafe { bpf_sk_release(sk.cast()) };
    true
}

/// True when a TCP listener accepts on 127.0.0.1:`port` (host order) in this namespace.
#[inline(always)]
pub(crate) fn listening4(ctx: &SockAddrContext, port: u16) -> bool {
    let loopback = 0x7f00_0001u32.to_be();
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                saddr: loopback,
                daddr: loopback,
                sport: 0,
                dport: port.to_be(),
            },
        },
    };
    lookup(
        ctx,
        &mut tuple,
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>(),
    )
}

/// True when a TCP listener accepts on [::1]:`port` (host order) in this namespace.
#[inline(always)]
pub(crate) fn listening6(ctx: &SockAddrContext, port: u16) -> bool {
    let loopback = [0, 0, 0, 1u32.to_be()];
    let mut tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: loopback,
                daddr: loopback,
                sport: 0,
                dport: port.to_be(),
            },
        },
    };
    lookup(
        ctx,
        &mut tuple,
        core::mem::size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>(),
    )
}
