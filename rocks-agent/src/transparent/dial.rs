//! One transparent dial: a socket bound to the client's address connecting to a destination
//! on this host.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::MARK;
use crate::net::{ConnectError, connect_within, set_u32_option};

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
    #[error("no free source port for the client's address: {0}")]
    NoPort(String),
}


/// The source ports transparent dials use: below the ephemeral ranges of Linux (32768-60999 by
/// default) and of Windows and macOS (49152-65535). The client host picks its own connections'
/// ports from those ranges without knowing ours, so a port from there could collide with a
/// direct connection the client host opens to the same destination: that connection's SYN
/// would then land on the relayed connection's socket and time out (measured: with 5,000 kept
/// connections to one server port, about one direct connect in six to that port did).
const PORTS: std::ops::RangeInclusive<u16> = 1024..=32767;
/// Ports tried per dial: a port is refused when this host already has a connection with the
/// same four-tuple or something bound to it.
const PORT_ATTEMPTS: usize = 32;

/// Connects to `dst` from `client`'s address (a port from [`PORTS`]), giving up after
/// `timeout`.
pub async fn connect(client: IpAddr, dst: SocketAddr, timeout: Duration) -> Result<TcpStream, DialError> {
    let client = client.to_canonical();
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    if client.is_ipv4() != dst.is_ipv4() {
        return Err(DialError::FamilyMismatch { client, dst });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = rand::random_range(PORTS);
        let socket = transparent_socket(client, port)?;
        let Some(socket) = socket else { continue };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match connect_within(socket, dst, left).await {
            Err(ConnectError::TimedOut(_)) => return Err(DialError::TimedOut(timeout)),
            Err(ConnectError::Refused) => return Err(DialError::Refused),
            // The four-tuple exists already (another relayed connection from this port).
            Err(ConnectError::Other(e)) if e.kind() == io::ErrorKind::AddrNotAvailable => last = Some(e),
            Err(ConnectError::Other(e)) => return Err(DialError::Connect(e)),
            Ok(stream) => return Ok(stream),
        }
    }
    Err(DialError::NoPort(last.map_or_else(|| "every port tried was bound".to_owned(), |e| e.to_string())))
}

/// A socket bound to `client`:`port` with the transparent mark, or `None` when that port is
/// taken on this host.
fn transparent_socket(client: IpAddr, port: u16) -> Result<Option<TcpSocket>, DialError> {
    let step = |step: &'static str| move |source| DialError::Socket { step, source };
    let socket = if client.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(step("socket"))?;
    set_u32_option(&socket, libc::SOL_SOCKET, libc::SO_MARK, MARK).map_err(step("SO_MARK"))?;
    if client.is_ipv4() {
        set_u32_option(&socket, libc::SOL_IP, libc::IP_TRANSPARENT, 1).map_err(step("IP_TRANSPARENT"))?;
    } else {
        set_u32_option(&socket, libc::SOL_IPV6, libc::IPV6_TRANSPARENT, 1).map_err(step("IPV6_TRANSPARENT"))?;
    }
    // Several relayed connections from one client may share a port toward different
    // destinations: connect() still refuses a four-tuple that exists.
    socket.set_reuseaddr(true).map_err(step("SO_REUSEADDR"))?;
    socket.set_nodelay(true).map_err(step("TCP_NODELAY"))?;
    match socket.bind(SocketAddr::new(client, port)) {
        Ok(()) => Ok(Some(socket)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => Err(DialError::Socket { step: "bind to the client's address", source: e }),
    }
}
