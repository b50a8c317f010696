//! One transparent dial: a socket bound to the client's address connecting to a destination
//! on this host.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::MARK;

/// Why a transparent dial did not produce a connection. `Refused` and `TimedOut` are the
/// destination's answers; the others mean the dial itself could not be made as asked.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connection refused")]
    Refused,
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the client's address {client} and the destination {dst} are of different address families")]
    FamilyMismatch { client: IpAddr, dst: SocketAddr },
    #[error("{step}: {source}")]
    Socket { step: &'static str, source: io::Error },
    #[error("connect: {0}")]
    Connect(io::Error),
}

fn set_int(fd: &impl AsRawFd, level: libc::c_int, name: libc::c_int, value: u32) -> io::Result<()> {
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

/// Connects to `dst` from `client`'s address (any port), giving up after `timeout`.
pub async fn connect(client: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let client = client.to_canonical();
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if client.is_ipv4() != dst.is_ipv4() {
        return Err(DialError::FamilyMismatch { client, dst });
    }
    let step = |step: &'static str| move |source| DialError::Socket { step, source };
    let socket = if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(step("socket"))?;
    set_int(&socket, libc::SOL_SOCKET, libc::SO_MARK, MARK).map_err(step("SO_MARK"))?;
    if client.is_ipv4() {
        set_int(&socket, libc::SOL_IP, libc::IP_TRANSPARENT, 1).map_err(step("IP_TRANSPARENT"))?;
    } else {
        set_int(&socket, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1).map_err(step("IPV6_TRANSPARENT"))?;
    }
    // The port is picked at connect time, unique per 4-tuple, rather than at bind time,
    // unique per client address: many connections from one client host would otherwise run
    // out of ports long before the 4-tuples run out.
    set_int(&socket, libc::SOL_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1).map_err(step("IP_BIND_ADDRESS_NO_PORT"))?;
    socket.bind(SocketAddr::new(client, 0)).map_err(step("bind to the client's address"))?;
    socket.set_nodelay(true).map_err(step("TCP_NODELAY"))?;
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Err(_) => Err(DialError::TimedOut(timeout)),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(DialError::Refused),
        Ok(Err(e)) => Err(DialError::Connect(e)),
        Ok(Ok(stream)) => Ok(stream),
    }
}
