//! Probes this kernel for the sockmap defects an application would notice once its socket is
//! in the fast path's sockhash. Being in a sockhash swaps the socket's receive path for
//! `tcp_bpf`'s, whichever way its data arrives, so the fast path cannot be made safe by
//! choosing what to redirect: `auto` engages only where these probes pass.
//!
//! Both probes use a loopback connection of the agent's own, one end in the real sockhash
//! (the `sk_msg` program lets its messages pass: the ports match no fast-path connection).
//! Measured on Linux 6.18 (`net/ipv4/tcp_bpf.c`): both defects are present.
//!
//! - FIONREAD: `tcp_bpf_ioctl` answers `SIOCINQ` with the sk_msg queue's length only, so
//!   bytes that arrived by TCP are reported as 0.
//! - A blocking `recv()` returns EAGAIN: `tcp_bpf_recvmsg` waits for data, and when any
//!   wake-up ends the wait without data (the socket's send buffer draining wakes readers too)
//!   it returns `-EAGAIN` instead of waiting again.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::{Duration, Instant},
};

use rocks_common::{AF_INET, SockKey};

use crate::redirect::{RedirectError, Redirector};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot set up the probe's loopback connection")]
    Io(#[from] io::Error),
    #[error("cannot put the probe's socket into the sockhash")]
    Map(#[from] RedirectError),
}

/// A defect found, as operators read it in logs and `status`.
pub type Defect = &'static str;

pub const FIONREAD_DEFECT: Defect =
    "FIONREAD on a socket in a sockmap reports only sk_msg data, not bytes that came by TCP";
pub const PROBE_FAILED: Defect = "the sockmap probe could not run";
pub const EAGAIN_DEFECT: Defect =
    "a blocking recv() on a socket in a sockmap returns EAGAIN when woken without data";

/// How long the blocking reader may wait; a correct kernel returns the byte sent after
/// `WAKE_AT + BYTE_AFTER`, well before.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
const WAKE_AT: Duration = Duration::from_millis(100);
const BYTE_AFTER: Duration = Duration::from_millis(300);

/// Runs both probes; returns the defects found (empty: the sockmap receive path behaves).
pub fn probe(redirector: &Redirector) -> Result<Vec<Defect>, ProbeError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let mut peer = TcpStream::connect(listener.local_addr()?)?;
    let (mapped, _) = listener.accept()?;
    let key = sock_key(mapped.local_addr()?, mapped.peer_addr()?);
    redirector.insert_probe_socket(key, &mapped)?;
    let result = run(&mapped, &mut peer);
    // Closing removes it too; explicit, so the map never holds it longer than the probe.
    redirector.remove_probe_socket(&key);
    Ok(result?)
}

fn run(mapped: &TcpStream, peer: &mut TcpStream) -> io::Result<Vec<Defect>> {
    let mut defects = Vec::new();
    if !fionread_counts_tcp(mapped, peer)? {
        defects.push(FIONREAD_DEFECT);
    }
    if !blocking_recv_waits(mapped, peer)? {
        defects.push(EAGAIN_DEFECT);
    }
    Ok(defects)
}

fn sock_key(local: SocketAddr, remote: SocketAddr) -> SockKey {
    let v4 = |a: SocketAddr| match a.ip() {
        std::net::IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
        std::net::IpAddr::V6(_) => 0,
    };
    SockKey {
        family: AF_INET,
        local_port: u32::from(local.port()),
        remote_port: u32::from(remote.port()),
        local_addr: [v4(local), 0, 0, 0],
        remote_addr: [v4(remote), 0, 0, 0],
    }
}

/// Ten bytes by TCP, then FIONREAD must say ten.
fn fionread_counts_tcp(mapped: &TcpStream, peer: &mut TcpStream) -> io::Result<bool> {
    peer.write_all(b"0123456789")?;
    let mut pfd = libc::pollfd {
        fd: mapped.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, 2000) } != 1 {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "probe bytes never arrived",
        ));
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(mapped.as_raw_fd(), libc::FIONREAD, &mut avail) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 10];
    (&*mapped).read_exact(&mut buf)?;
    Ok(avail == 10)
}

/// A reader blocked in recv() while the socket's full send buffer drains (which wakes it
/// without data) must keep waiting for the byte that follows.
fn blocking_recv_waits(mapped: &TcpStream, peer: &mut TcpStream) -> io::Result<bool> {
    // Fill the send buffer: the peer reads nothing yet.
    mapped.set_nonblocking(true)?;
    let chunk = vec![0u8; 64 << 10];
    let mut queued = 0usize;
    loop {
        match (&*mapped).write(&chunk) {
            Ok(n) => queued += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
        if queued > 256 << 20 {
            return Err(io::Error::other("the probe's send buffer never filled"));
        }
    }
    mapped.set_nonblocking(false)?;
    mapped.set_read_timeout(Some(READ_TIMEOUT))?;
    let reader = mapped.try_clone()?;
    let handle = std::thread::spawn(move || {
        let started = Instant::now();
        let mut byte = [0u8; 1];
        let got = (&reader).read(&mut byte);
        (got, started.elapsed())
    });
    std::thread::sleep(WAKE_AT);
    // Drain what the mapped end queued: its send buffer empties and wakes its waiters.
    peer.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut sink = vec![0u8; 64 << 10];
    let mut drained = 0usize;
    while drained < queued {
        let n = peer.read(&mut sink)?;
        if n == 0 {
            return Err(io::Error::other("the probe's peer saw EOF"));
        }
        drained += n;
    }
    std::thread::sleep(BYTE_AFTER);
    peer.write_all(b"x")?;
    let (got, waited) = handle
        .join()
        .map_err(|_| io::Error::other("probe reader panicked"))?;
    Ok(match got {
        Ok(1) => true,
        // EAGAIN before the timeout: woken without data and gave up. At the timeout the byte
        // never came, which is no better.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let _ = waited;
            false
        }
        Ok(_) => false,
        Err(e) => return Err(e),
    })
}
