//! Watches this network namespace for address, route and link changes (rtnetlink multicast
//! groups) and tells client sessions, which then resume on a fresh transport at once instead
//! of waiting for the dead-path timer.
use std::{io, os::fd::OwnedFd};

use nix::sys::socket::{
    AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket, MsgFlags,
};
use tokio::{io::unix::AsyncFd, sync::broadcast};
use tracing::{debug, warn};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV4_ROUTE: u32 = 0x40;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const RTMGRP_IPV6_ROUTE: u32 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;

/// True when a buffer of netlink messages holds at least one change worth a resume.
pub fn has_path_change(buf: &[u8]) -> bool {
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        if matches!(kind, RTM_NEWLINK | RTM_DELLINK | RTM_NEWADDR | RTM_DELADDR | RTM_NEWROUTE | RTM_DELROUTE) {
            return true;
        }
        // Messages are 4-byte aligned; a zero or short length would loop forever.
        let step = (len + 3) & !3;
        if len < 16 || step > rest.len() {
            return false;
        }
        rest = &rest[step..];
    }
    false
}

/// Starts watching; each burst of changes becomes one notification on the returned channel.
pub fn spawn() -> io::Result<broadcast::Sender<()>> {
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &NetlinkAddr::new(0, groups))?;
    // SAFETY: the AsyncFd owns the socket for its whole life and never swaps its fd.
    let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
    let (tx, _) = broadcast::channel(16);
    let sender = tx.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let Ok(mut guard) = fd.readable().await else { return };
            // Drain everything queued, so one burst (delete address, delete route, add address,
            // add route) gives one notification per wake-up.
            let mut changed = false;
            loop {
                match recv(std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()), &mut buf, MsgFlags::empty()) {
                    Ok(0) => break,
                    Ok(n) => changed |= has_path_change(&buf[..n]),
                    Err(nix::errno::Errno::EAGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    // ENOBUFS: we missed messages; assume something changed.
                    Err(nix::errno::Errno::ENOBUFS) => changed = true,
                    Err(e) => {
                        warn!(error = %e, "netlink watch failed; resumes will rely on the dead-path timer");
                        return;
                    }
                }
            }
            if changed {
                debug!("network change");
                let _ = sender.send(());
            }
        }
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink header claiming `len` bytes, in a buffer of at least the header's size.
    fn msg(kind: u16, len: u32) -> Vec<u8> {
        let mut m = vec![0u8; (len as usize).max(16)];
        m[0..4].copy_from_slice(&len.to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m
    }

    #[test]
    fn recognizes_address_and_route_changes() {
        assert!(has_path_change(&msg(RTM_NEWADDR, 16)));
        let mut two = msg(3 /* NLMSG_DONE */, 20);
        two.extend(msg(RTM_DELROUTE, 16));
        assert!(has_path_change(&two));
        assert!(!has_path_change(&msg(3, 16)));
    }

    #[test]
    fn garbage_never_loops_or_panics() {
        assert!(!has_path_change(&[]));
        assert!(!has_path_change(&msg(99, 0)));
        assert!(!has_path_change(&[0xff; 15]));
        let mut truncated = msg(99, 4096);
        truncated.truncate(40);
        assert!(!has_path_change(&truncated));
    }
}
