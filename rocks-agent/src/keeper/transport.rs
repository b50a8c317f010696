//! A session's TCP transports (to the peer agent), read and written by the session's driver
//! task itself.
//!
//! Why not a reader and a writer task per transport, talking to the driver over channels: every
//! hop between tasks is a wake-up, on a small machine usually a cross-thread one (~30 µs on the
//! 2-vCPU VM of docs/benchmarks.md), and a request/response crossed four of them in each agent.
//! The driver polls the sockets' readiness directly instead, as it does for the local socket.
use std::{
    cell::RefCell,
    collections::{HashMap, VecDeque},
    io,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::session::TransportId;

/// Bytes read from a transport or a local socket in one go.
pub(super) const READ_CHUNK: usize = 64 << 10;
/// Sealed bytes queued for a socket above which the core stops giving it data frames, and below
/// which it starts again: the kernel's send buffer is the real queue; ours only smooths bursts.
const BACKLOG_HIGH: usize = 256 << 10;
const BACKLOG_LOW: usize = 64 << 10;
/// How long a transport the core is done with may take to flush its last bytes.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

thread_local! {
    /// One read buffer per runtime thread, not per transport: the core copies what it is given
    /// (into its record reassembly), so the buffer is free again as soon as a read is handed
    /// over, and thousands of idle transports hold none.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this runtime thread's read buffer (`READ_CHUNK` bytes). `f` must hand what it
/// reads on before returning: the buffer is the next reader's.
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        if buf.len() < READ_CHUNK {
            buf.resize(READ_CHUNK, 0);
        }
        f(&mut buf[..])
    })
}

pub(super) struct Transport {
    stream: TcpStream,
    /// Sealed records the socket has not taken yet.
    out: VecDeque<Bytes>,
    queued: usize,
    /// What the core was last told about this transport (see `Session::set_backlogged`).
    backlogged: bool,
    /// The peer closed it or an I/O call failed: nothing more is read or written, and the
    /// driver has told the core (once).
    failed: bool,
}

/// A transport whose socket has something for the driver.
pub(super) enum Ready {
    Readable(TransportId),
    Writable(TransportId),
}

impl Transport {
    pub(super) fn new(stream: TcpStream) -> Transport {
        Transport { stream, out: VecDeque::new(), queued: 0, backlogged: false, failed: false }
    }

    /// Reads what is waiting and hands it to `deliver`. False when the transport is lost
    /// (end of stream or an error): the caller tells the core.
    pub(super) fn read(&mut self, deliver: impl FnOnce(&[u8])) -> bool {
        if self.failed {
            return true;
        }
        let outcome = with_scratch(|buf| {
            match self.stream.try_read(buf) {
                Ok(0) => Err(()),
                Ok(n) => {
                    deliver(&buf[..n]);
                    Ok(())
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                Err(_) => Err(()),
            }
        });
        self.fail_if(outcome.is_err())
    }

    /// Queues a sealed record; [`Transport::write`] sends it.
    pub(super) fn queue(&mut self, data: Bytes) {
        if !self.failed {
            self.queued += data.len();
            self.out.push_back(data);
        }
    }

    /// Whether the core should stop (`Some(true)`) or resume (`Some(false)`) giving this
    /// transport data frames; `None` when nothing changed.
    pub(super) fn backlog_change(&mut self) -> Option<bool> {
        let now = if self.backlogged { self.queued > BACKLOG_LOW } else { self.queued > BACKLOG_HIGH };
        (now != self.backlogged).then(|| {
            self.backlogged = now;
            now
        })
    }

    /// Writes what the socket takes now. False when the transport is lost.
    pub(super) fn write(&mut self) -> bool {
        while let Some(front) = self.out.front_mut() {
            match self.stream.try_write(front) {
                Ok(n) if n == front.len() => {
                    self.queued -= n;
                    self.out.pop_front();
                }
                Ok(n) => {
                    self.queued -= n;
                    front.advance(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(_) => return self.fail_if(true),
            }
        }
        true
    }

    fn fail_if(&mut self, lost: bool) -> bool {
        if lost && !self.failed {
            self.failed = true;
            self.out.clear();
            self.queued = 0;
            return false;
        }
        true
    }

    /// Graceful: what is queued is flushed (bounded by `CLOSE_LINGER`), then the write side
    /// is shut down.
    pub(super) fn close(mut self) {
        if self.failed {
            return;
        }
        tokio::spawn(async move {
            let flush = async {
                for chunk in self.out.drain(..) {
                    if self.stream.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = self.stream.shutdown().await;
            };
            let _ = tokio::time::timeout(CLOSE_LINGER, flush).await;
        });
    }

    /// Abortive: the transport is dead or untrusted; nothing more is written to it.
    pub(super) fn kill(self) {}
}

/// The first transport with something to do: readable, or writable while it has queued
/// records. Pending (with wake-ups registered) when none has.
pub(super) fn poll_ready(cx: &mut Context<'_>, transports: &HashMap<TransportId, Transport>) -> Poll<Ready> {
    for (&id, t) in transports {
        if t.failed {
            continue;
        }
        // An error counts as ready: the read or write that follows reports it.
        if t.stream.poll_read_ready(cx).is_ready() {
            return Poll::Ready(Ready::Readable(id));
        }
        if !t.out.is_empty() && t.stream.poll_write_ready(cx).is_ready() {
            return Poll::Ready(Ready::Writable(id));
        }
    }
    Poll::Pending
}
