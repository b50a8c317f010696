//! Watches this network namespace for address, route and link changes (rtnetlink multicast
//! groups) and tells client sessions, which then resume on a fresh transport at once instead
//! of waiting for the dead-path timer.
use std::{io, os::fd::OwnedFd, time::Duration};

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

const NLMSG_HDRLEN: usize = 16;
const IFA_F_TENTATIVE: u8 = 0x40;
/// Scopes at or above this (site 200, link 253, host 254, nowhere 255) never carry a session.
const RT_SCOPE_SITE: u8 = 200;
const RT_TABLE_LOCAL: u8 = 255;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;

/// True when a buffer of netlink messages holds at least one change that can move a session's
/// path. Link-local and host-scope addresses, tentative (DAD) addresses, the local routing table
/// and non-unicast or link-local routes are noise an IPv6 host sees all the time; a resume for
/// each would churn every session for nothing.
pub fn has_path_change(buf: &[u8]) -> bool {
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        // Messages are 4-byte aligned; a zero or short length would loop forever.
        let step = (len + 3) & !3;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return false;
        }
        if relevant(kind, &rest[NLMSG_HDRLEN..len]) {
            return true;
        }
        if step >= rest.len() {
            return false;
        }
        rest = &rest[step..];
    }
    false
}

fn relevant(kind: u16, body: &[u8]) -> bool {
    match kind {
        RTM_NEWLINK | RTM_DELLINK => true,
        RTM_NEWADDR | RTM_DELADDR => {
            // struct ifaddrmsg { family, prefixlen, flags, scope, index }
            let [_family, _prefix, flags, scope, ..] = *body else { return false };
            scope < RT_SCOPE_SITE && (kind == RTM_DELADDR || flags & IFA_F_TENTATIVE == 0)
        }
        RTM_NEWROUTE | RTM_DELROUTE => {
            // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags }
            if body.len() < 12 {
                return false;
            }
            let (table, kind) = (body[4], body[7]);
            if table == RT_TABLE_LOCAL || kind != RTN_UNICAST {
                return false;
            }
            !route_dst_is_link_local(&body[12..])
        }
        _ => false,
    }
}

/// Looks for an IPv6 `RTA_DST` in fe80::/10 or ff00::/8 among the route's attributes.
fn route_dst_is_link_local(mut attrs: &[u8]) -> bool {
    while attrs.len() >= 4 {
        let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
        let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            return false;
        }
        if kind == RTA_DST && len == 4 + 16 {
            let first = u16::from_be_bytes([attrs[4], attrs[5]]);
            return first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00;
        }
        let step = (len + 3) & !3;
        if step >= attrs.len() {
            return false;
        }
        attrs = &attrs[step..];
    }
    false
}

/// One address change arrives as a burst (address removed, routes removed, address added,
/// routes added, IPv6 neighbour state). Resuming on its first message would restart the resume
/// for each later one, and a connect made before the new address and route are complete can
/// lose its SYN (a 1 s retransmission). So wait until the burst has been quiet for `QUIET`,
/// but never longer than `SETTLE_MAX` in all.
const QUIET: Duration = Duration::from_millis(20);
const SETTLE_MAX: Duration = Duration::from_millis(150);

async fn settle(fd: &AsyncFd<OwnedFd>, buf: &mut [u8]) {
    let deadline = tokio::time::Instant::now() + SETTLE_MAX;
    loop {
        let quiet_until = (tokio::time::Instant::now() + QUIET).min(deadline);
        let Ok(Ok(mut guard)) = tokio::time::timeout_at(quiet_until, fd.readable()).await else { return };
        loop {
            match recv(std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()), buf, MsgFlags::empty()) {
                Ok(0) => break,
                Ok(_) | Err(nix::errno::Errno::ENOBUFS) => {}
                Err(_) => {
                    guard.clear_ready();
                    break;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
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
                settle(&fd, &mut buf).await;
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

    /// A netlink message of `kind` with `body`; the header claims `len` bytes if given.
    fn msg_with(kind: u16, body: &[u8], len: Option<u32>) -> Vec<u8> {
        let total = 16 + body.len();
        let mut m = vec![0u8; total];
        m[0..4].copy_from_slice(&len.unwrap_or(total as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&kind.to_ne_bytes());
        m[16..].copy_from_slice(body);
        m
    }

    fn msg(kind: u16, len: u32) -> Vec<u8> {
        msg_with(kind, &[], Some(len))
    }

    fn addr(kind: u16, flags: u8, scope: u8) -> Vec<u8> {
        msg_with(kind, &[10, 64, flags, scope, 2, 0, 0, 0], None)
    }

    fn route(table: u8, rtype: u8, dst6: Option<[u8; 16]>) -> Vec<u8> {
        let mut body = vec![10, 64, 0, 0, table, 4, 0, rtype, 0, 0, 0, 0];
        if let Some(dst) = dst6 {
            body.extend_from_slice(&20u16.to_ne_bytes());
            body.extend_from_slice(&RTA_DST.to_ne_bytes());
            body.extend_from_slice(&dst);
        }
        msg_with(RTM_NEWROUTE, &body, None)
    }

    #[test]
    fn recognizes_address_and_route_changes() {
        assert!(has_path_change(&addr(RTM_NEWADDR, 0, 0)));
        assert!(has_path_change(&addr(RTM_DELADDR, IFA_F_TENTATIVE, 0)));
        assert!(has_path_change(&msg(RTM_NEWLINK, 16)));
        let global: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(has_path_change(&route(254, RTN_UNICAST, Some(global))));
        let mut two = msg(3 /* NLMSG_DONE */, 16);
        two.extend(addr(RTM_DELADDR, 0, 0));
        assert!(has_path_change(&two));
        assert!(!has_path_change(&msg(3, 16)));
    }

    #[test]
    fn ignores_link_local_and_local_table_noise() {
        assert!(!has_path_change(&addr(RTM_NEWADDR, 0, 253)), "link-scope address");
        assert!(!has_path_change(&addr(RTM_NEWADDR, 0, 254)), "host-scope address");
        assert!(!has_path_change(&addr(RTM_NEWADDR, IFA_F_TENTATIVE, 0)), "tentative address");
        let fe80: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let ff00: [u8; 16] = [0xff, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(!has_path_change(&route(254, RTN_UNICAST, Some(fe80))));
        assert!(!has_path_change(&route(254, 5 /* multicast */, Some(ff00))));
        assert!(!has_path_change(&route(RT_TABLE_LOCAL, 2 /* local */, None)));
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
