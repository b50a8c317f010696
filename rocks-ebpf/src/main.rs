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
//! - `sock_release` (cgroup): forget a socket's original destination when the socket closes.
//!
//! Every decision that leaves a connection alone returns "allow" unchanged: a bug or a full map
//! here must degrade to ordinary TCP, never to a failed connect.//! The programs only exist for the bpf target (`rocks-agent`'s build script builds them with
//! aya-build); on any other target this crate is an empty binary, so `cargo build --workspace`
//! works on the host.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod addr;
#[cfg(target_arch = "bpf")]
mod connect;
#[cfg(target_arch = "bpf")]
mod fastpath;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod listener;
#[cfg(target_arch = "bpf")]
mod peername;
#[cfg(target_arch = "bpf")]
mod release;

/// Allow the syscall to proceed (cgroup sock_addr programs: 1 = allow).
#[cfg(target_arch = "bpf")]
const ALLOW: i32 = 1;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!(
        "rocks-ebpf holds eBPF programs: it is built for the bpf target by rocks-agent's build script"
    );
}
