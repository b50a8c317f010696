//! The two routing objects transparent dials need, written as plain rtnetlink requests (no
//! `ip` binary, no netlink crate): a policy rule `fwmark MARK lookup TABLE` and a route
//! `local default dev lo table TABLE`, per address family. Each request asks for an ACK, so
//! every failure comes back as an errno we can name.
use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send, socket,
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;

// struct rtmsg / fib_rule_hdr fields and attributes (linux/rtnetlink.h, linux/fib_rules.h).
const RT_TABLE_UNSPEC: u8 = 0;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;
const RTA_OIF: u16 = 4;
const RTA_TABLE: u16 = 15;
const FR_ACT_TO_TBL: u8 = 1;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;

/// Address family of a rule or route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> u8 {
        match self {
            Family::V4 => libc::AF_INET as u8,
            Family::V6 => libc::AF_INET6 as u8,
        }
    }
}

/// `fwmark <mark>/0xffffffff lookup <table> priority <priority>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkRule {
    pub family: Family,
    pub mark: u32,
    pub table: u32,
    pub priority: u32,
}

/// `local default dev <oif> table <table>`: everything looked up in `table` is delivered to
/// this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalDefault {
    pub family: Family,
    pub table: u32,
    pub oif: u32,
}

/// A blocking rtnetlink socket for a handful of requests at start and exit.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkRoute)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        Ok(Rtnl { fd, seq: 0 })
    }

    /// Adds `rule`; `EEXIST` if an identical one is there.
    pub fn add_rule(&mut self, rule: &MarkRule) -> io::Result<()> {
        self.request(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, &rule_body(rule))
    }

    /// Deletes one rule matching `rule`; `ENOENT` when there is none.
    pub fn delete_rule(&mut self, rule: &MarkRule) -> io::Result<()> {
        self.request(RTM_DELRULE, 0, &rule_body(rule))
    }

    /// Adds `route`; `EEXIST` if it is there.
    pub fn add_route(&mut self, route: &LocalDefault) -> io::Result<()> {
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &route_body(route))
    }

    /// Deletes `route`; `ESRCH` (or `ENOENT`) when it is not there.
    pub fn delete_route(&mut self, route: &LocalDefault) -> io::Result<()> {
        self.request(RTM_DELROUTE, 0, &route_body(route))
    }

    /// Sends one request and waits for its ACK (an `NLMSG_ERROR` with error 0).
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = message(kind, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, body);
        send(self.fd.as_raw_fd(), &msg, MsgFlags::empty())?;
        let mut buf = vec![0u8; 8192];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            if let Some(result) = ack_for(&buf[..n], self.seq) {
                return result;
            }
        }
    }
}

fn message(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

fn attr_u32(out: &mut Vec<u8>, kind: u16, value: u32) {
    out.extend_from_slice(&8u16.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&value.to_ne_bytes());
}

/// Tables above 255 do not fit the header's byte: it then says "unspecified" and the
/// attribute carries the id, as iproute2 does.
fn table_byte(table: u32) -> u8 {
    u8::try_from(table).unwrap_or(RT_TABLE_UNSPEC)
}

fn rule_body(rule: &MarkRule) -> Vec<u8> {
    // struct fib_rule_hdr { family, dst_len, src_len, tos, table, res1, res2, action, flags: u32 }
    let mut b = vec![rule.family.af(), 0, 0, 0, table_byte(rule.table), 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attr_u32(&mut b, FRA_PRIORITY, rule.priority);
    attr_u32(&mut b, FRA_FWMARK, rule.mark);
    attr_u32(&mut b, FRA_FWMASK, u32::MAX);
    attr_u32(&mut b, FRA_TABLE, rule.table);
    b
}

fn route_body(route: &LocalDefault) -> Vec<u8> {
    // struct rtmsg { family, dst_len, src_len, tos, table, protocol, scope, type, flags: u32 };
    // dst_len 0 and no RTA_DST: the default route of the family.
    let mut b =
        vec![route.family.af(), 0, 0, 0, table_byte(route.table), RTPROT_STATIC, RT_SCOPE_HOST, RTN_LOCAL, 0, 0, 0, 0];
    attr_u32(&mut b, RTA_TABLE, route.table);
    attr_u32(&mut b, RTA_OIF, route.oif);
    b
}

/// The outcome carried by the `NLMSG_ERROR` answering request `seq` in `buf`, if it is there.
fn ack_for(buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Some(Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink answer")));
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if kind == NLMSG_ERROR && msg_seq == seq && len >= NLMSG_HDRLEN + 4 {
            let errno = i32::from_ne_bytes(rest[NLMSG_HDRLEN..NLMSG_HDRLEN + 4].try_into().ok()?);
            return Some(if errno == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-errno)) });
        }
        rest = &rest[((len + 3) & !3).min(rest.len())..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_layout() {
        let rule = MarkRule { family: Family::V6, mark: 0x726f_6374, table: 29_295, priority: 4470 };
        let body = rule_body(&rule);
        assert_eq!(body.len(), 12 + 4 * 8);
        assert_eq!(body[0], libc::AF_INET6 as u8);
        assert_eq!(body[4], RT_TABLE_UNSPEC, "a table above 255 goes in the attribute");
        assert_eq!(body[7], FR_ACT_TO_TBL);
        // FRA_FWMARK carries the mark.
        assert_eq!(&body[12 + 8..12 + 16], &[8, 0, 10, 0, 0x74, 0x63, 0x6f, 0x72][..]);
        let small = MarkRule { table: 100, ..rule };
        assert_eq!(rule_body(&small)[4], 100);
    }

    #[test]
    fn acks_and_errors_are_matched_by_sequence() {
        let err = |seq: u32, errno: i32| {
            let mut body = errno.to_ne_bytes().to_vec();
            body.extend_from_slice(&message(RTM_NEWRULE, 0, seq, &[]));
            message(NLMSG_ERROR, 0, seq, &body)
        };
        assert!(matches!(ack_for(&err(7, 0), 7), Some(Ok(()))));
        let e = ack_for(&err(7, -libc::EPERM), 7).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        assert!(ack_for(&err(6, 0), 7).is_none(), "an answer to another request");
        let mut two = err(6, -libc::EEXIST);
        two.extend(err(7, -libc::ENOENT));
        assert_eq!(ack_for(&two, 7).unwrap().unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(ack_for(&[1, 2, 3], 7).is_none());
        assert!(ack_for(&message(NLMSG_ERROR, 0, 7, &[])[..16], 7).is_none(), "too short to carry an errno");
    }
}
