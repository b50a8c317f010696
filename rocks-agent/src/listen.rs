//! Binding the agent's listening sockets with errors that say which port and why.
use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt, socket,
    sockopt,
};
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{what} port {addr} is already in use (another agent or program listens there){hint}")]
    InUse { what: &'static str, addr: SocketAddr, hint: &'static str },
    #[error("cannot listen on {what} address {addr}")]
    Other { what: &'static str, addr: SocketAddr, #[source] source: io::Error },
}

/// Binds a TCP listener. An IPv6 unspecified address (`[::]`) is bound dual-stack, so IPv4
/// peers reach it too; any other IPv6 address is IPv6-only.
pub fn tcp(addr: SocketAddr, what: &'static str, hint: &'static str) -> Result<TcpListener, ListenError> {
    let err = |e: nix::Error| {
        let source = io::Error::from(e);
        if source.raw_os_error() == Some(libc::EADDRINUSE) {
            ListenError::InUse { what, addr, hint }
        } else {
            ListenError::Other { what, addr, source }
        }
    };
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK, None).map_err(err)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(err)?;
    if let SocketAddr::V6(v6) = addr {
        setsockopt(&fd, sockopt::Ipv6V6Only, &(*v6.ip() != Ipv6Addr::UNSPECIFIED)).map_err(err)?;
    }
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr)).map_err(err)?;
    listen(&fd, Backlog::new(4096).unwrap_or(Backlog::MAXCONN)).map_err(err)?;
    let std_listener = std::net::TcpListener::from(fd);
    TcpListener::from_std(std_listener).map_err(|source| ListenError::Other { what, addr, source })
}

/// The agent's loopback listeners for redirected connections: IPv4 always; IPv6 when the
/// host has IPv6 loopback.
pub fn redirect_listeners(port: u16) -> Result<Vec<TcpListener>, ListenError> {
    const HINT: &str = "; choose another with --redirect-port";
    let mut listeners = vec![tcp(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), "redirect", HINT)?];
    match tcp(SocketAddr::from((Ipv6Addr::LOCALHOST, port)), "redirect", HINT) {
        Ok(l) => listeners.push(l),
        Err(ListenError::Other { source, .. }) if source.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {
            tracing::warn!("no IPv6 loopback here: IPv6 connections will not be kept");
        }
        Err(e) => return Err(e),
    }
    Ok(listeners)
}
