//! Socket helpers: the agent's own sockets carry [`AGENT_SOCKET_MARK`] so the connect hooks
//! never redirect them; connects are bounded in time; a peer may only make us dial our own
//! addresses.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use rocks_common::AGENT_SOCKET_MARK;
use tokio::net::{TcpSocket, TcpStream};

/// Sets an integer socket option (`SO_MARK`, `IP_TRANSPARENT`, ...).
pub(crate) fn set_u32_option(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: u32) -> io::Result<()> {
    // SAFETY: valid fd and option pointer/length.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn set_mark(fd: &impl AsRawFd) -> io::Result<()> {
    let Err(e) = set_u32_option(fd, libc::SOL_SOCKET, libc::SO_MARK, AGENT_SOCKET_MARK) else {
        return Ok(());
    };
    // SO_MARK needs CAP_NET_ADMIN. Only an unprivileged `serve` lacks it (`attach` refuses to
    // start without it), and that agent attached no connect hooks that would have to skip
    // this socket: go on unmarked rather than fail every connection it carries.
    if e.raw_os_error() == Some(libc::EPERM) {
        return Ok(());
    }
    Err(e)
}

/// Why an outbound connect did not produce a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connection refused")]
    Refused,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
    Other(#[from] io::Error),
}

/// Connects to `dst` from a marked socket, giving up after `timeout`.
pub async fn connect_marked(dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    set_mark(&socket)?;
    socket.set_nodelay(true)?;
    connect_within(socket, dst, timeout).await
}

/// Connects a prepared socket to `dst`, giving up after `timeout`.
pub(crate) async fn connect_within(socket: TcpSocket, dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Err(_) => Err(ConnectError::TimedOut(timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(ConnectError::Refused),
        Ok(Err(e)) => Err(ConnectError::Other(e)),
        Ok(Ok(stream)) => Ok(stream),
    }
}

/// Closes `stream` with a RST instead of a FIN, so the application sees the connection fail
/// the way a direct connection to a dead destination would.
pub fn abort(stream: TcpStream) {
    // A zero linger makes close() send RST at once; it never blocks.
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: valid fd and option pointer/length.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// True when `ip` is configured on an interface of this host (in this network namespace).
/// A peer agent may only ask us to connect to such addresses: no open relay.
pub fn is_local_address(ip: IpAddr) -> io::Result<bool> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() {
        return Ok(false);
    }
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs.filter_map(|a| a.address).any(|sa| {
        sa.as_sockaddr_in().map(|s| IpAddr::V4(s.ip())) == Some(ip)
            || sa.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())) == Some(ip)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_foreign_addresses_are_not_local_targets() {
        assert!(!is_local_address("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local_address("::1".parse().unwrap()).unwrap());
        assert!(!is_local_address("0.0.0.0".parse().unwrap()).unwrap());
        // TEST-NET-3 is never configured on a test machine.
        assert!(!is_local_address("203.0.113.77".parse().unwrap()).unwrap());
    }
}
