//! `rocks-fastpath-app`: the application side of the fast-path regression tests. It receives
//! the way programs that tripped over sockmap receive (`splice()` into a pipe, `FIONREAD`
//! before `read()`), sends the way they send (many small writes), half-closes, pauses reading,
//! and opens MPTCP sockets. Every byte is checked against a deterministic pattern and hashed
//! on both ends; results are JSON on stdout.
//!
//! ```text
//! rocks-fastpath-app serve --listen ADDR:PORT
//! rocks-fastpath-app client --connect ADDR:PORT --op sink|source --len SIZE [--reply SIZE]
//!     [--recv read|splice|fionread] [--chunk N] [--delay-ms MS] [--sample-ms MS]
//!     [--pause-ms MS] [--mptcp]
//! ```
//!
//! One connection (integers big-endian): the client sends a header, [`HEADER_LEN`] bytes:
//! magic `RKFPAPP1`, `op` u32, reserved u32, `len` u64, `reply` u64, `delay_ms` u64,
//! `sample_ms` u64. Then:
//!
//! - `sink`: the client sends `len` bytes and half-closes; the server, after not reading for
//!   `delay_ms`, reads to EOF, then answers with the count (u64) and sha256 of what it read,
//!   followed by `reply` bytes, and closes. The client (the side that closed first) reads the
//!   answer to EOF.
//! - `source`: the server sends `len` bytes and half-closes; the client (now in CLOSE_WAIT)
//!   reads them to EOF, then sends `reply` bytes and closes; the server reads them to EOF.
//!
//! The sender of the stream records how many bytes `write()` had accepted `sample_ms` after the
//! header, and when: with the reader paused, that is what the path buffered for it.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use rocks_e2e::testpeer::{BLOCK, Direction, Pattern, hex, parse_size};
use serde::Serialize;
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};

const MAGIC: [u8; 8] = *b"RKFPAPP1";
const HEADER_LEN: usize = 48;
const ANSWER_LEN: usize = 40;
const SEED: u64 = 5;
/// `IPPROTO_MPTCP`.
const IPPROTO_MPTCP: i32 = 262;
/// A receiver that makes no progress for this long while its socket polls readable reports a
/// stall instead of hanging until the test's timeout.
const STALL: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(name = "rocks-fastpath-app")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve connections (one thread each); one JSON line per finished connection.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// One connection; prints a JSON report; exit status 1 on any error or mismatch.
    Client(ClientArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Sink,
    Source,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Recv {
    /// read(2) on a blocking socket, as most programs do: EAGAIN is an error there.
    Blocking,
    /// poll(2), then read(2) on a non-blocking socket (an event loop).
    Read,
    /// splice(2) from the socket into a pipe, then read(2) from the pipe.
    Splice,
    /// ioctl(FIONREAD) after poll(2) says readable, then read exactly that much.
    Fionread,
}

#[derive(clap::Args)]
struct ClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    #[arg(long, value_enum)]
    op: Op,
    /// Bytes of the stream (client to server for sink, server to client for source).
    #[arg(long, value_parser = parse_size)]
    len: u64,
    /// Bytes the side that closed second sends after the other side's EOF.
    #[arg(long, value_parser = parse_size, default_value = "0")]
    reply: u64,
    /// How the client receives.
    #[arg(long, value_enum, default_value = "read")]
    recv: Recv,
    /// Largest write; with `--small-writes` each write is 1..=chunk bytes.
    #[arg(long, default_value_t = BLOCK)]
    chunk: usize,
    #[arg(long)]
    small_writes: bool,
    /// sink: after each this many bytes, stop writing for `--burst-pause-ms`.
    #[arg(long, value_parser = parse_size)]
    burst: Option<u64>,
    #[arg(long, default_value_t = 0)]
    burst_pause_ms: u64,
    /// sink: the server reads nothing for this long.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// When to sample the sender's accepted byte count (0: not at all).
    #[arg(long, default_value_t = 0)]
    sample_ms: u64,
    /// source: the client reads nothing for this long after sending the header.
    #[arg(long, default_value_t = 0)]
    pause_ms: u64,
    /// Open the socket with IPPROTO_MPTCP.
    #[arg(long)]
    mptcp: bool,
    /// Receive like an event loop (poll, then recv with MSG_DONTWAIT, EAGAIN means "poll
    /// again") everywhere, instead of blocking reads for the answer and the final EOF.
    #[arg(long)]
    nonblocking: bool,
}

struct Header {
    op: Op,
    len: u64,
    reply: u64,
    delay_ms: u64,
    sample_ms: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        let op: u32 = match self.op {
            Op::Sink => 1,
            Op::Source => 2,
        };
        b[8..12].copy_from_slice(&op.to_be_bytes());
        for (i, v) in [self.len, self.reply, self.delay_ms, self.sample_ms]
            .into_iter()
            .enumerate()
        {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&v.to_be_bytes());
        }
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Result<Header> {
        ensure!(b[..8] == MAGIC, "bad header magic {:02x?}", &b[..8]);
        let op = match u32::from_be_bytes(b[8..12].try_into()?) {
            1 => Op::Sink,
            2 => Op::Source,
            other => bail!("unknown op {other}"),
        };
        let at = |i: usize| u64::from_be_bytes(b[16 + i * 8..24 + i * 8].try_into().unwrap());
        Ok(Header {
            op,
            len: at(0),
            reply: at(1),
            delay_ms: at(2),
            sample_ms: at(3),
        })
    }
}

/// CLOCK_MONOTONIC in ns: one clock for every process on the machine, whatever namespace,
/// so the server's and the client's events can be ordered by the test.
fn mono_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("monotonic");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// What a sender saw: how much `write()` accepted, and when it was sampled.
#[derive(Default, Serialize)]
struct Sample {
    accepted: Option<u64>,
    at_mono_ns: Option<u64>,
}

/// What a receiver saw.
#[derive(Default, Serialize)]
struct Received {
    bytes: u64,
    sha256: String,
    /// Stream offset of the first byte that broke the pattern.
    mismatch_at: Option<u64>,
    /// When the first read was attempted (after any pause).
    read_start_mono_ns: u64,
    fionread_checks: u64,
    fionread_violations: u64,
    first_violation: Option<String>,
}

#[derive(Default, Serialize)]
struct ServerLine {
    op: Option<Op>,
    peer: String,
    received: Option<Received>,
    sent: u64,
    sent_sha256: String,
    sample: Sample,
    error: Option<String>,
}

#[derive(Default, Serialize)]
struct ClientReport {
    /// SO_PROTOCOL of the socket: 6 (TCP) or 262 (MPTCP).
    protocol: i32,
    peername: String,
    sockname: String,
    sent: u64,
    sent_sha256: String,
    writes: u64,
    sample: Sample,
    received: Option<Received>,
    /// sink: the server's count and sha256 of what it read.
    server_count: Option<u64>,
    server_sha256: Option<String>,
    ok: bool,
    error: Option<String>,
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Serve { listen } => serve(listen),
        Cmd::Client(args) => client(&args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("rocks-fastpath-app: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------- server

fn serve(listen: SocketAddr) -> Result<bool> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    for stream in listener.incoming() {
        let stream = stream.context("accept")?;
        thread::spawn(move || {
            let mut line = ServerLine {
                peer: stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                ..ServerLine::default()
            };
            if let Err(e) = serve_one(stream, &mut line) {
                line.error = Some(format!("{e:#}"));
            }
            let mut out = io::stdout().lock();
            let _ = writeln!(out, "{}", serde_json::to_string(&line).expect("json"));
            let _ = out.flush();
        });
    }
    Ok(true)
}

fn serve_one(mut stream: TcpStream, line: &mut ServerLine) -> Result<()> {
    let mut head = [0u8; HEADER_LEN];
    stream.read_exact(&mut head).context("reading the header")?;
    let h = Header::decode(&head)?;
    line.op = Some(h.op);
    match h.op {
        Op::Sink => {
            thread::sleep(Duration::from_millis(h.delay_ms));
            let received = receive(&stream, Recv::Blocking, Pattern::new(SEED, Direction::Up))?;
            let mut answer = Vec::with_capacity(ANSWER_LEN);
            answer.extend_from_slice(&received.bytes.to_be_bytes());
            answer.extend_from_slice(&hex_to_bytes(&received.sha256));
            line.received = Some(received);
            stream.write_all(&answer).context("writing the answer")?;
            let (n, sha) = send(&stream, h.reply, Direction::Down, BLOCK, false, None)?;
            line.sent = n;
            line.sent_sha256 = sha;
            stream.shutdown(Shutdown::Write)?;
            expect_eof(&mut stream)?;
        }
        Op::Source => {
            let accepted = Arc::new(AtomicU64::new(0));
            let sampler = start_sampler(h.sample_ms, accepted.clone());
            let (n, sha) = send(
                &stream,
                h.len,
                Direction::Down,
                BLOCK,
                false,
                Some(&accepted),
            )?;
            line.sent = n;
            line.sent_sha256 = sha;
            line.sample = join_sampler(sampler);
            // Our half is done; the client reads the rest, sees EOF and only then replies.
            stream.shutdown(Shutdown::Write)?;
            line.received = Some(receive(
                &stream,
                Recv::Read,
                Pattern::new(SEED, Direction::Up),
            )?);
        }
    }
    Ok(())
}

fn hex_to_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

// ---------------------------------------------------------------- both

/// Sends `len` bytes of the `dir` pattern in writes of `chunk` bytes (with `small`, of 1..=chunk
/// bytes, varying); returns the count and sha256. `accepted` follows progress.
fn send(
    mut w: &TcpStream,
    len: u64,
    dir: Direction,
    chunk: usize,
    small: bool,
    accepted: Option<&AtomicU64>,
) -> Result<(u64, String)> {
    let (n, sha, _) = send_stream(&mut w, len, dir, chunk, small, accepted, None)?;
    Ok((n, sha))
}

/// As [`send`], also returning the number of write() calls.
fn send_stream(
    w: &mut impl Write,
    len: u64,
    dir: Direction,
    chunk: usize,
    small: bool,
    accepted: Option<&AtomicU64>,
    bursts: Option<(u64, Duration)>,
) -> Result<(u64, String, u64)> {
    let mut pattern = Pattern::new(SEED, dir);
    let mut sha = Sha256::new();
    let mut done = 0u64;
    let mut writes = 0u64;
    // A fixed xorshift for the write sizes: runs repeat exactly.
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut pending: Vec<u8> = Vec::new();
    while done < len {
        if pending.is_empty() {
            let want = (len - done).min(BLOCK as u64) as usize;
            pending.extend_from_slice(pattern.next_chunk(want));
        }
        let size = if small {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            1 + (rng % chunk.max(1) as u64) as usize
        } else {
            chunk
        };
        let mut size = size.min(pending.len());
        if let Some((burst, _)) = bursts {
            // End each write at a burst boundary.
            size = size.min((burst - done % burst) as usize);
        }
        let n = match w.write(&pending[..size]) {
            Ok(0) => bail!("write returned 0 after {done} of {len} bytes"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("write after {done} of {len} bytes")),
        };
        writes += 1;
        sha.update(&pending[..n]);
        pending.drain(..n);
        done += n as u64;
        if let Some(a) = accepted {
            a.store(done, Ordering::SeqCst);
        }
        if let Some((burst, pause)) = bursts
            && done.is_multiple_of(burst)
        {
            thread::sleep(pause);
        }
    }
    Ok((done, hex(&sha.finalize()), writes))
}

fn expect_eof(stream: &mut TcpStream) -> Result<()> {
    let mut buf = [0u8; 4096];
    let mut extra = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => extra += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the peer's close"),
        }
    }
    ensure!(extra == 0, "{extra} unexpected bytes after the end");
    Ok(())
}

fn start_sampler(sample_ms: u64, accepted: Arc<AtomicU64>) -> Option<thread::JoinHandle<Sample>> {
    (sample_ms > 0).then(|| {
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(sample_ms));
            Sample {
                accepted: Some(accepted.load(Ordering::SeqCst)),
                at_mono_ns: Some(mono_ns()),
            }
        })
    })
}

fn join_sampler(sampler: Option<thread::JoinHandle<Sample>>) -> Sample {
    sampler
        .map(|s| s.join().expect("sampler"))
        .unwrap_or_default()
}

/// Waits until `fd` polls readable, up to `timeout`; false on timeout.
fn poll_readable(fd: i32, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        return Ok(rc > 0);
    }
}

fn errno_result(rc: isize) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

/// Receives to EOF the way `how` says, checking every byte against `pattern`. The socket is
/// switched to non-blocking and waited on with poll(2), so a receiver that the kernel wakes
/// but gives nothing (data stuck where this receive call does not look) reports a stall
/// instead of hanging.
fn receive(stream: &TcpStream, how: Recv, mut pattern: Pattern) -> Result<Received> {
    if how == Recv::Blocking {
        return receive_blocking(stream, pattern);
    }
    stream.set_nonblocking(true)?;
    let fd = stream.as_raw_fd();
    let mut out = Received {
        read_start_mono_ns: mono_ns(),
        ..Received::default()
    };
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let pipe = if how == Recv::Splice {
        let mut fds = [0i32; 2];
        // SAFETY: valid out-array of two fds.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("pipe2");
        }
        Some(fds)
    } else {
        None
    };
    let mut last_progress = Instant::now();
    let result = loop {
        if last_progress.elapsed() > STALL {
            break Err(anyhow::anyhow!(
                "stalled: no data for {STALL:?} after {} bytes ({})",
                out.bytes,
                if poll_readable(fd, Duration::ZERO)? {
                    "the socket polls readable"
                } else {
                    "the socket does not poll readable"
                }
            ));
        }
        if !poll_readable(fd, Duration::from_millis(200))? {
            continue;
        }
        let got: io::Result<usize> = match how {
            Recv::Blocking => unreachable!("handled above"),
            Recv::Read => {
                // SAFETY: buf is valid for its length.
                errno_result(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
            }
            Recv::Splice => {
                let [pr, pw] = pipe.expect("pipe");
                // SAFETY: valid fds; null offsets for a socket and a pipe.
                let moved = errno_result(unsafe {
                    libc::splice(
                        fd,
                        std::ptr::null_mut(),
                        pw,
                        std::ptr::null_mut(),
                        BLOCK,
                        libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
                    )
                });
                match moved {
                    Ok(0) => Ok(0),
                    Ok(n) => {
                        let mut filled = 0;
                        while filled < n {
                            // SAFETY: buf holds at least n bytes.
                            let r = errno_result(unsafe {
                                libc::read(pr, buf[filled..].as_mut_ptr().cast(), n - filled)
                            })
                            .context("read from the pipe")?;
                            ensure!(r > 0, "pipe closed");
                            filled += r;
                        }
                        Ok(n)
                    }
                    Err(e) => Err(e),
                }
            }
            Recv::Fionread => {
                let mut avail: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int.
                if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut avail) } != 0 {
                    break Err(io::Error::last_os_error()).context("ioctl(FIONREAD)");
                }
                out.fionread_checks += 1;
                let want = if avail > 0 {
                    (avail as usize).min(buf.len())
                } else {
                    buf.len()
                };
                // SAFETY: buf holds at least `want` bytes.
                let r = errno_result(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), want) });
                match (&r, avail) {
                    // Readable, FIONREAD said nothing is there, and yet read() returned data.
                    (Ok(n), 0) if *n > 0 => {
                        out.fionread_violations += 1;
                        out.first_violation.get_or_insert_with(|| {
                            format!(
                                "at offset {}: FIONREAD said 0 but read() returned {n} bytes",
                                out.bytes
                            )
                        });
                    }
                    // FIONREAD promised more than read() could deliver.
                    (Ok(n), a) if a > 0 && *n < want => {
                        out.fionread_violations += 1;
                        out.first_violation.get_or_insert_with(|| {
                            format!(
                                "at offset {}: FIONREAD said {a} but read() returned {n} bytes",
                                out.bytes
                            )
                        });
                    }
                    (Err(e), a) if a > 0 && e.kind() == io::ErrorKind::WouldBlock => {
                        out.fionread_violations += 1;
                        out.first_violation.get_or_insert_with(|| {
                            format!(
                                "at offset {}: FIONREAD said {a} but read() would block",
                                out.bytes
                            )
                        });
                    }
                    _ => {}
                }
                r
            }
        };
        match got {
            Ok(0) => break Ok(()),
            Ok(n) => {
                sha.update(&buf[..n]);
                if out.mismatch_at.is_none() {
                    out.mismatch_at = pattern.verify(&buf[..n]).err();
                }
                out.bytes += n as u64;
                last_progress = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e).context(format!("receiving after {} bytes", out.bytes)),
        }
    };
    if let Some([pr, pw]) = pipe {
        // SAFETY: our own pipe fds, closed once.
        unsafe {
            libc::close(pr);
            libc::close(pw);
        }
    }
    stream.set_nonblocking(false)?;
    result?;
    out.sha256 = hex(&sha.finalize());
    Ok(out)
}

/// Receives to EOF with plain blocking read(2) calls.
fn receive_blocking(mut stream: &TcpStream, mut pattern: Pattern) -> Result<Received> {
    let mut out = Received {
        read_start_mono_ns: mono_ns(),
        ..Received::default()
    };
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).context(format!(
                    "blocking read() after {} bytes (EAGAIN here means the kernel gave up waiting)",
                    out.bytes
                ));
            }
        };
        sha.update(&buf[..n]);
        if out.mismatch_at.is_none() {
            out.mismatch_at = pattern.verify(&buf[..n]).err();
        }
        out.bytes += n as u64;
    }
    out.sha256 = hex(&sha.finalize());
    Ok(out)
}

// ---------------------------------------------------------------- client

fn connect(args: &ClientArgs) -> Result<(TcpStream, i32)> {
    let domain = Domain::for_address(args.connect);
    let protocol = if args.mptcp {
        Protocol::from(IPPROTO_MPTCP)
    } else {
        Protocol::TCP
    };
    let socket = Socket::new(domain, Type::STREAM, Some(protocol))
        .with_context(|| format!("socket(protocol {})", i32::from(protocol)))?;
    socket
        .connect_timeout(&args.connect.into(), Duration::from_secs(10))
        .with_context(|| format!("connect {}", args.connect))?;
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd and out-pointer for an int option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&raw mut proto).cast(),
            &mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt(SO_PROTOCOL): {}",
        io::Error::last_os_error()
    );
    Ok((socket.into(), proto))
}

fn client(args: &ClientArgs) -> Result<bool> {
    let mut report = ClientReport::default();
    let result = run_client(args, &mut report);
    if let Err(e) = &result {
        report.error = Some(format!("{e:#}"));
    }
    report.ok = result.is_ok();
    println!("{}", serde_json::to_string(&report)?);
    Ok(report.ok)
}

fn run_client(args: &ClientArgs, report: &mut ClientReport) -> Result<()> {
    let (mut stream, protocol) = connect(args)?;
    report.protocol = protocol;
    report.peername = stream.peer_addr()?.to_string();
    report.sockname = stream.local_addr()?.to_string();
    let header = Header {
        op: args.op,
        len: args.len,
        reply: args.reply,
        delay_ms: args.delay_ms,
        sample_ms: args.sample_ms,
    };
    stream
        .write_all(&header.encode())
        .context("sending the header")?;
    match args.op {
        Op::Sink => {
            let accepted = Arc::new(AtomicU64::new(0));
            let sampler = start_sampler(args.sample_ms, accepted.clone());
            let (n, sha, writes) = send_stream(
                &mut &stream,
                args.len,
                Direction::Up,
                args.chunk,
                args.small_writes,
                Some(&accepted),
                args.burst
                    .map(|b| (b.max(1), Duration::from_millis(args.burst_pause_ms))),
            )?;
            (report.sent, report.sent_sha256, report.writes) = (n, sha.clone(), writes);
            report.sample = join_sampler(sampler);
            // We close first; the server reads to EOF and answers.
            stream.shutdown(Shutdown::Write)?;
            let mut answer = [0u8; ANSWER_LEN];
            read_exact(&stream, &mut answer, args.nonblocking)
                .context("reading the server's answer")?;
            let count = u64::from_be_bytes(answer[..8].try_into()?);
            let server_sha = hex(&answer[8..]);
            report.server_count = Some(count);
            report.server_sha256 = Some(server_sha.clone());
            let received = receive(&stream, args.recv, Pattern::new(SEED, Direction::Down))?;
            let reply = (received.bytes, received.mismatch_at);
            report.received = Some(received);
            ensure!(
                count == n && server_sha == sha,
                "the server read {count} bytes (sha256 {server_sha}), we sent {n} (sha256 {sha})"
            );
            ensure!(
                reply == (args.reply, None),
                "reply: {} of {} bytes, first bad byte at {:?}",
                reply.0,
                args.reply,
                reply.1
            );
        }
        Op::Source => {
            thread::sleep(Duration::from_millis(args.pause_ms));
            let received = receive(&stream, args.recv, Pattern::new(SEED, Direction::Down))?;
            let got = (received.bytes, received.mismatch_at);
            report.received = Some(received);
            ensure!(
                got == (args.len, None),
                "stream: {} of {} bytes, first bad byte at {:?}",
                got.0,
                args.len,
                got.1
            );
            // In CLOSE_WAIT now: the reply still has to get through.
            let (n, sha) = send(&stream, args.reply, Direction::Up, BLOCK, false, None)?;
            (report.sent, report.sent_sha256) = (n, sha);
            stream.shutdown(Shutdown::Write)?;
            if args.nonblocking {
                let rest = receive(&stream, Recv::Read, Pattern::new(SEED, Direction::Down))?;
                ensure!(
                    rest.bytes == 0,
                    "{} unexpected bytes after the end",
                    rest.bytes
                );
            } else {
                expect_eof(&mut stream)?;
            }
        }
    }
    Ok(())
}

/// `read_exact`, blocking, or event-loop style: poll, then recv(MSG_DONTWAIT), where EAGAIN
/// just means "poll again".
fn read_exact(stream: &TcpStream, buf: &mut [u8], nonblocking: bool) -> Result<()> {
    if !nonblocking {
        return Ok((&*stream).read_exact(buf)?);
    }
    let fd = stream.as_raw_fd();
    let mut done = 0;
    let deadline = Instant::now() + STALL;
    while done < buf.len() {
        ensure!(
            Instant::now() < deadline,
            "stalled after {done} of {} bytes",
            buf.len()
        );
        if !poll_readable(fd, Duration::from_millis(200))? {
            continue;
        }
        // SAFETY: the rest of buf is valid for writes.
        let r = unsafe {
            libc::recv(
                fd,
                buf[done..].as_mut_ptr().cast(),
                buf.len() - done,
                libc::MSG_DONTWAIT,
            )
        };
        match errno_result(r) {
            Ok(0) => bail!("EOF after {done} of {} bytes", buf.len()),
            Ok(n) => done += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
