//! Other agents with transparent dials in the same network namespace (the VM tests run one
//! `serve` per address family; an operator might too). They share one rule, one route and the
//! sysctls, so the first to exit must not take them away from the others, and the last must put
//! back the sysctl values from before the first one.
//!
//! Each agent announces itself with an abstract unix socket named
//! `rocks-transparent:<pid>:<original values>`. Abstract names belong to the network namespace
//! and vanish with the process, SIGKILL included, so `/proc/self/net/unix` always lists exactly
//! the live agents of this namespace, and the original sysctl values travel with them.
use std::{
    io,
    os::{linux::net::SocketAddrExt, unix::net::UnixDatagram},
};

const PREFIX: &str = "rocks-transparent:";

/// A live agent of this namespace, as its announcement names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: u32,
    /// The sysctl values from before the first agent changed them, in the order the
    /// announcing agent checked them; `None` where it had none to restore.
    pub originals: Vec<Option<String>>,
}

/// Our announcement; dropping it withdraws it.
pub struct Announcement {
    _socket: UnixDatagram,
}

pub fn announce(originals: &[Option<String>]) -> io::Result<Announcement> {
    let name = format!("{PREFIX}{}:{}", std::process::id(), encode(originals));
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    Ok(Announcement { _socket: UnixDatagram::bind_addr(&addr)? })
}

/// The other live agents of this network namespace.
pub fn others() -> io::Result<Vec<Peer>> {
    let table = std::fs::read_to_string("/proc/self/net/unix")?;
    let me = std::process::id();
    Ok(parse_table(&table).into_iter().filter(|p| p.pid != me).collect())
}

fn encode(originals: &[Option<String>]) -> String {
    originals.iter().map(|o| o.as_deref().unwrap_or("-")).collect::<Vec<_>>().join(",")
}

/// Announcements in the text of `/proc/net/unix` (abstract names are shown as `@name`, the
/// last column).
fn parse_table(table: &str) -> Vec<Peer> {
    table
        .lines()
        .filter_map(|line| line.split_whitespace().last()?.strip_prefix('@')?.strip_prefix(PREFIX))
        .filter_map(|rest| {
            let (pid, values) = rest.split_once(':')?;
            let originals = values.split(',').map(|v| (v != "-" && !v.is_empty()).then(|| v.to_owned())).collect();
            Some(Peer { pid: pid.parse().ok()?, originals })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcements_are_found_in_the_socket_table() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 51 @rocks-transparent:41:0,-,1\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 52 /run/rocks/control.sock\n\
            0000000000000000: 00000002 00000000 00000000 0002 01 53 @rocks-transparent:junk\n\
            0000000000000000: 00000003 00000000 00000000 0001 03 54\n";
        assert_eq!(
            parse_table(table),
            vec![Peer { pid: 41, originals: vec![Some("0".to_owned()), None, Some("1".to_owned())] }]
        );
        assert_eq!(encode(&[Some("0".to_owned()), None]), "0,-");
    }

    #[test]
    fn an_announcement_is_seen_while_it_lives() {
        // Our own pid is filtered out of `others`, so read the table directly.
        let originals = [Some("0".to_owned()), None, Some("0".to_owned())];
        let a = announce(&originals).unwrap();
        let table = std::fs::read_to_string("/proc/self/net/unix").unwrap();
        let me = Peer { pid: std::process::id(), originals: originals.to_vec() };
        assert!(parse_table(&table).contains(&me));
        drop(a);
        let table = std::fs::read_to_string("/proc/self/net/unix").unwrap();
        assert!(!parse_table(&table).contains(&me));
    }
}
