//! `rocks-testpeer`: a TCP peer that moves deterministic data both ways at once and verifies
//! every byte (pattern check and sha256 on both sides). Results are JSON on stdout; the
//! protocol is described in `rocks_e2e::testpeer`.
//!
//! ```text
//! rocks-testpeer serve --listen ADDR:PORT [--count N]
//! rocks-testpeer client --connect ADDR:PORT --up SIZE --down SIZE [--seed S] [--bind ADDR]
//!                       [--pause-after SIZE --pause-ms MS] [--connect-timeout-ms MS]
//! rocks-testpeer getpeername --connect ADDR:PORT [--bind ADDR] [--hold-ms MS]
//! rocks-testpeer storm --connect ADDR:PORT --count N --up SIZE --down SIZE [--seed S]
//! ```

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::{Args, Parser, Subcommand};
use rocks_e2e::testpeer::{
    AddrReport, BLOCK, ClientReport, Direction, Pattern, REQUEST_LEN, Request, ServerRecord,
    TRAILER_LEN, encode_response_header, hex, parse_size, read_response_header,
};
use sha2::{Digest, Sha256};

// In a subdirectory: a file directly in src/bin would become a binary of its own.
#[path = "testpeer/storm.rs"]
mod storm;

#[derive(Parser)]
#[command(
    name = "rocks-testpeer",
    about = "Byte-exact TCP test peer for rocks end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept connections and serve the protocol; one JSON line per connection.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Exit after this many connections have finished (status 1 if any failed).
        #[arg(long)]
        count: Option<u64>,
        /// The listen() backlog (the kernel caps it at net.core.somaxconn).
        #[arg(long, default_value_t = 128)]
        backlog: i32,
    },
    /// Run one transfer and print a JSON report; exit status 1 on any error or mismatch.
    Client(ClientArgs),
    /// Connect, print getpeername()/getsockname() as JSON, close.
    Getpeername {
        #[command(flatten)]
        conn: ConnectArgs,
        /// Keep the connection open this long before closing.
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
    },
    /// Open `--count` connections at once, then run a small transfer on each; print one JSON
    /// report; exit status 1 unless every connection succeeded.
    Storm(storm::StormArgs),
}

#[derive(Args)]
struct ConnectArgs {
    /// Server address, ADDR:PORT ([v6]:PORT).
    #[arg(long)]
    connect: String,
    /// Local address to bind before connecting: IP or IP:PORT.
    #[arg(long)]
    bind: Option<String>,
    /// Give up connecting after this long (0: the kernel's own timeout).
    #[arg(long, default_value_t = 10_000)]
    connect_timeout_ms: u64,
}

#[derive(Args)]
struct ClientArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Bytes to send (suffixes K/M/G, KiB..., KB...).
    #[arg(long, value_parser = parse_size)]
    up: u64,
    /// Bytes to receive.
    #[arg(long, value_parser = parse_size)]
    down: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop sending and reading once this many bytes went each way...
    #[arg(long, value_parser = parse_size, requires = "pause_ms")]
    pause_after: Option<u64>,
    /// ...for this long, so a test can inject a fault mid-stream.
    #[arg(long, requires = "pause_after")]
    pause_ms: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Serve {
            listen,
            count,
            backlog,
        } => serve(listen, count, backlog),
        Cmd::Client(args) => client(&args),
        Cmd::Getpeername { conn, hold_ms } => getpeername(&conn, hold_ms),
        Cmd::Storm(args) => storm::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rocks-testpeer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_json(value: &impl serde::Serialize) {
    // One write of a whole line under the lock, so concurrent connections never interleave.
    let line = serde_json::to_string(value).expect("serializable") + "\n";
    let mut out = io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// The address as text, IPv4-mapped IPv6 shown as IPv4 (a dual-stack listener's view).
fn addr_text(a: SocketAddr) -> String {
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

// ---------------------------------------------------------------- server

fn serve(listen: SocketAddr, count: Option<u64>, backlog: i32) -> Result<()> {
    let listener = bind_listener(listen, backlog).with_context(|| format!("listen on {listen}"))?;
    eprintln!("rocks-testpeer: listening on {}", listener.local_addr()?);
    let mut handles = Vec::new();
    let mut accepted = 0;
    while count.is_none_or(|c| accepted < c) {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                // E.g. ECONNABORTED or EMFILE: keep serving the others.
                eprintln!("rocks-testpeer: accept: {e}");
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        accepted += 1;
        let h = thread::spawn(move || {
            let rec = serve_conn(stream, peer);
            print_json(&rec);
            rec.ok
        });
        // Without --count the server runs until killed: nothing to collect.
        if count.is_some() {
            handles.push(h);
        }
    }
    drop(listener);
    let failed = handles
        .into_iter()
        .map(|h| h.join())
        .filter(|r| !matches!(r, Ok(true)))
        .count();
    ensure!(failed == 0, "{failed} of {accepted} connections failed");
    Ok(())
}

/// Like `TcpListener::bind`, with the backlog chosen (std always asks for 128).
fn bind_listener(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog)?;
    Ok(sock.into())
}

fn serve_conn(stream: TcpStream, peer: SocketAddr) -> ServerRecord {
    let start = Instant::now();
    let mut rec = ServerRecord {
        peer: addr_text(peer),
        ..Default::default()
    };
    rec.local = stream.local_addr().map(addr_text).unwrap_or_default();
    if let Err(e) = serve_protocol(stream, &mut rec) {
        rec.error = Some(format!("{e:#}"));
    }
    rec.total_ms = start.elapsed().as_millis() as u64;
    rec.ok = rec.error.is_none() && rec.up_mismatch_at.is_none();
    rec
}

fn serve_protocol(mut stream: TcpStream, rec: &mut ServerRecord) -> Result<()> {
    let mut head = [0u8; REQUEST_LEN];
    stream
        .read_exact(&mut head)
        .context("reading the request header")?;
    let req = Request::decode(&head).map_err(|e| anyhow!(e))?;
    rec.flags = req.flags;
    stream
        .write_all(&encode_response_header(&rec.peer))
        .context("sending the response header")?;

    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stream, received) = (stream.try_clone()?, Arc::clone(&received));
        thread::spawn(move || {
            receive(
                stream,
                req.up_len,
                Pattern::new(req.seed, Direction::Up),
                None,
                &received,
            )
        })
    };
    let sent = AtomicU64::new(0);
    let sent_result = send(
        &mut stream,
        req.down_len,
        req.seed,
        Direction::Down,
        None,
        &sent,
    );
    let recv_result = reader
        .join()
        .map_err(|_| anyhow!("receiver thread panicked"))?;
    rec.up = received.load(Ordering::SeqCst);
    rec.down = sent.load(Ordering::SeqCst);
    let down_sha = sent_result.context("sending the download")?;
    let received = recv_result.context("receiving the upload")?;
    rec.up_sha256 = hex(&received.sha256);
    rec.down_sha256 = hex(&down_sha);
    rec.up_mismatch_at = received.mismatch_at;

    let mut trailer = [0u8; TRAILER_LEN];
    trailer[..32].copy_from_slice(&received.sha256);
    trailer[32..].copy_from_slice(&down_sha);
    stream.write_all(&trailer).context("sending the trailer")?;
    stream.shutdown(Shutdown::Write)?;
    expect_eof(&mut stream)
}

// ---------------------------------------------------------------- both sides

/// Where to stall once: after `after` bytes in each direction, for `duration`.
#[derive(Clone, Copy)]
struct Pause {
    after: u64,
    duration: Duration,
}

/// Limits the next I/O so it ends exactly at the pause point, and sleeps when there.
fn pause_point(pause: &mut Option<Pause>, done: u64, max: usize) -> usize {
    match *pause {
        Some(p) if done == p.after => {
            thread::sleep(p.duration);
            *pause = None;
            max
        }
        Some(p) if done < p.after => max.min((p.after - done).try_into().unwrap_or(usize::MAX)),
        _ => max,
    }
}

/// Sends `len` bytes of the pattern; returns their sha256. `sent` counts progress.
fn send(
    w: &mut impl Write,
    len: u64,
    seed: u64,
    dir: Direction,
    mut pause: Option<Pause>,
    sent: &AtomicU64,
) -> Result<[u8; 32]> {
    let mut pattern = Pattern::new(seed, dir);
    let mut sha = Sha256::new();
    let mut done = 0;
    while done < len {
        let max = pause_point(&mut pause, done, (len - done).min(BLOCK as u64) as usize);
        let chunk = pattern.next_chunk(max);
        w.write_all(chunk)
            .with_context(|| format!("after {done} of {len} bytes"))?;
        sha.update(chunk);
        done += chunk.len() as u64;
        sent.store(done, Ordering::SeqCst);
    }
    Ok(sha.finalize().into())
}

struct Received {
    sha256: [u8; 32],
    mismatch_at: Option<u64>,
}

/// Reads exactly `len` bytes, checking them against `pattern` and hashing them.
fn receive(
    mut r: impl Read,
    len: u64,
    mut pattern: Pattern,
    mut pause: Option<Pause>,
    received: &AtomicU64,
) -> Result<Received> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; BLOCK];
    let mut mismatch_at = None;
    let mut done = 0;
    while done < len {
        let max = pause_point(&mut pause, done, (len - done).min(BLOCK as u64) as usize);
        let n = match r.read(&mut buf[..max]) {
            Ok(0) => bail!("connection closed after {done} of {len} bytes"),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context(format!("after {done} of {len} bytes")),
        };
        sha.update(&buf[..n]);
        // Keep reading past a bad byte: the sha256 comparison still reports it, and the
        // sender is not left blocked.
        if mismatch_at.is_none() {
            mismatch_at = pattern.verify(&buf[..n]).err();
        }
        done += n as u64;
        received.store(done, Ordering::SeqCst);
    }
    Ok(Received {
        sha256: sha.finalize().into(),
        mismatch_at,
    })
}

/// After our half of the protocol: the peer must close without sending anything more.
fn expect_eof(stream: &mut TcpStream) -> Result<()> {
    let mut extra = 0u64;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => extra += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the peer's close"),
        }
    }
    ensure!(
        extra == 0,
        "{extra} unexpected bytes after the end of the protocol"
    );
    Ok(())
}

// ---------------------------------------------------------------- client

/// Connects (optionally from a bound address) and returns the stream and connect() duration.
fn connect(args: &ConnectArgs) -> Result<(TcpStream, Duration)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let addr = args
        .connect
        .to_socket_addrs()
        .with_context(|| format!("bad --connect {}", args.connect))?
        .next()
        .with_context(|| format!("{} resolves to nothing", args.connect))?;
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(b) = &args.bind {
        let local = b
            .parse::<SocketAddr>()
            .or_else(|_| b.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
            .with_context(|| format!("bad --bind {b}"))?;
        sock.bind(&local.into())
            .with_context(|| format!("bind {local}"))?;
    }
    let start = Instant::now();
    let res = match args.connect_timeout_ms {
        0 => sock.connect(&addr.into()),
        ms => sock.connect_timeout(&addr.into(), Duration::from_millis(ms)),
    };
    res.with_context(|| format!("connect to {addr}"))?;
    Ok((sock.into(), start.elapsed()))
}

fn getpeername(args: &ConnectArgs, hold_ms: u64) -> Result<()> {
    let (stream, took) = connect(args)?;
    print_json(&AddrReport {
        peername: addr_text(stream.peer_addr()?),
        sockname: addr_text(stream.local_addr()?),
        connect_us: took.as_micros() as u64,
    });
    thread::sleep(Duration::from_millis(hold_ms));
    Ok(())
}

fn client(args: &ClientArgs) -> Result<()> {
    let start = Instant::now();
    let mut rep = ClientReport::default();
    let result = run_client(args, &mut rep);
    rep.total_ms = start.elapsed().as_millis() as u64;
    if let Err(e) = &result {
        rep.error = Some(format!("{e:#}"));
    }
    // The report goes out in every case: a test wants to see how far a failed run got.
    print_json(&rep);
    result?;
    ensure!(
        rep.up_sha256_match,
        "upload sha256 differs: the server received other bytes"
    );
    ensure!(
        rep.down_sha256_match,
        "download differs from what the server sent"
    );
    Ok(())
}

fn run_client(args: &ClientArgs, rep: &mut ClientReport) -> Result<()> {
    let start = Instant::now();
    let (mut stream, took) = connect(&args.conn)?;
    rep.connect_us = took.as_micros() as u64;
    // Recorded at once: what the program believes it is connected to.
    rep.peername = addr_text(stream.peer_addr()?);
    rep.sockname = addr_text(stream.local_addr()?);
    let pause = args
        .pause_after
        .zip(args.pause_ms)
        .map(|(after, ms)| Pause {
            after,
            duration: Duration::from_millis(ms),
        });
    let req = Request {
        up_len: args.up,
        down_len: args.down,
        seed: args.seed,
        flags: 0,
    };

    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (mut w, sent) = (stream.try_clone()?, Arc::clone(&sent));
        thread::spawn(move || -> Result<[u8; 32]> {
            w.write_all(&req.encode())
                .context("sending the request header")?;
            send(&mut w, req.up_len, req.seed, Direction::Up, pause, &sent)
                .context("sending the upload")
        })
    };

    let received = AtomicU64::new(0);
    let down = (|| -> Result<(Received, [u8; TRAILER_LEN])> {
        rep.server_saw_peer =
            read_response_header(&mut stream).context("reading the response header")?;
        rep.first_byte_us = start.elapsed().as_micros() as u64;
        let pattern = Pattern::new(req.seed, Direction::Down);
        let got = receive(&mut stream, req.down_len, pattern, pause, &received)
            .context("receiving the download")?;
        let mut trailer = [0u8; TRAILER_LEN];
        stream
            .read_exact(&mut trailer)
            .context("reading the trailer")?;
        Ok((got, trailer))
    })();
    rep.down = received.load(Ordering::SeqCst);
    let (got, trailer) = down?;
    let up_sha = sender
        .join()
        .map_err(|_| anyhow!("sender thread panicked"))?;
    rep.up = sent.load(Ordering::SeqCst);
    let up_sha = up_sha?;

    rep.up_sha256 = hex(&up_sha);
    rep.down_sha256 = hex(&got.sha256);
    rep.up_sha256_match = trailer[..32] == up_sha;
    rep.down_sha256_match = trailer[32..] == got.sha256 && got.mismatch_at.is_none();
    if let Some(at) = got.mismatch_at {
        bail!("download byte {at} differs from the expected pattern");
    }
    stream.shutdown(Shutdown::Write)?;
    expect_eof(&mut stream)
}
