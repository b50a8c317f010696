//! `rocks-testpeer storm`: many connections opened at once, as a connection storm from one
//! program looks to the kernel and to rocks. Every connection is a thread (small stacks) that
//! waits for all threads to exist, connects, waits until every connect has returned (so all of
//! them are open together), and then runs the ordinary protocol with a small transfer, written
//! in one go and read back on the same thread.

use std::collections::BTreeMap;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use clap::Args;
use rocks_e2e::testpeer::{
    BLOCK, Direction, Pattern, Request, StormReport, TRAILER_LEN, parse_size, read_response_header,
};
use sha2::{Digest, Sha256};

use super::{ConnectArgs, addr_text, connect, expect_eof, print_json, receive};

#[derive(Args)]
pub struct StormArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// How many connections to open at once.
    #[arg(long)]
    count: u64,
    /// Bytes to send on each connection (at most 64 KiB: each is written in one go).
    #[arg(long, value_parser = parse_size)]
    up: u64,
    /// Bytes to receive on each connection (at most 64 KiB).
    #[arg(long, value_parser = parse_size)]
    down: u64,
    /// Connection i uses seed `seed + i`, so no two carry the same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Every thread's stack: the transfer buffers live on the heap.
const STACK: usize = 256 * 1024;
/// No single read may hang a storm forever.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Lets every waiting thread go once `expected` have arrived; `expected` is only known once
/// all threads are spawned (a failed spawn must not leave the others waiting forever).
#[derive(Default)]
struct Gate {
    state: Mutex<(u64, Option<u64>)>,
    cond: Condvar,
}

impl Gate {
    fn arrive_and_wait(&self) {
        let mut st = self.state.lock().unwrap();
        st.0 += 1;
        self.cond.notify_all();
        while st.1.is_none_or(|expected| st.0 < expected) {
            st = self.cond.wait(st).unwrap();
        }
    }

    fn expect(&self, n: u64) {
        self.state.lock().unwrap().1 = Some(n);
        self.cond.notify_all();
    }
}

pub fn run(args: StormArgs) -> Result<()> {
    ensure!(args.count > 0, "--count must be at least 1");
    ensure!(
        args.up <= BLOCK as u64 && args.down <= BLOCK as u64,
        "--up and --down are at most {BLOCK} bytes in a storm"
    );
    raise_nofile_limit(args.count)?;
    let dialed = args
        .conn
        .connect
        .to_socket_addrs()
        .with_context(|| format!("bad --connect {}", args.conn.connect))?
        .next()
        .with_context(|| format!("{} resolves to nothing", args.conn.connect))?;

    let args = Arc::new(args);
    let (ready, connected) = (Arc::new(Gate::default()), Arc::new(Gate::default()));
    let start = Arc::new(Mutex::new(None::<Instant>));
    let last_connect_us = Arc::new(AtomicU64::new(0));
    let connected_ok = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..args.count {
        let (args, ready, connected) = (args.clone(), ready.clone(), connected.clone());
        let (start, last_connect_us) = (start.clone(), last_connect_us.clone());
        let connected_ok = connected_ok.clone();
        let spawned = thread::Builder::new().stack_size(STACK).spawn(move || {
            ready.arrive_and_wait();
            let t0 = *start.lock().unwrap().get_or_insert_with(Instant::now);
            let conn = connect(&args.conn);
            last_connect_us.fetch_max(t0.elapsed().as_micros() as u64, Ordering::SeqCst);
            if conn.is_ok() {
                connected_ok.fetch_add(1, Ordering::SeqCst);
            }
            connected.arrive_and_wait();
            let (stream, _) = conn?;
            let req = Request {
                up_len: args.up,
                down_len: args.down,
                seed: args.seed.wrapping_add(i),
                flags: 0,
            };
            transfer(stream, req, dialed)
        });
        match spawned {
            Ok(h) => handles.push(h),
            Err(e) => {
                *errors
                    .entry(format!("cannot start a thread: {e}"))
                    .or_default() += 1
            }
        }
    }
    let n = handles.len() as u64;
    ready.expect(n);
    connected.expect(n);

    let mut report = StormReport {
        count: args.count,
        ..StormReport::default()
    };
    for h in handles {
        match h
            .join()
            .map_err(|_| anyhow!("thread panicked"))
            .and_then(|r| r)
        {
            Ok(loopback) => {
                report.ok += 1;
                report.via_loopback += u64::from(loopback);
            }
            Err(e) => *errors.entry(format!("{e:#}")).or_default() += 1,
        }
    }
    let t0 = start.lock().unwrap().unwrap_or_else(Instant::now);
    report.total_ms = t0.elapsed().as_millis() as u64;
    report.connect_ms = last_connect_us.load(Ordering::SeqCst) / 1000;
    report.connected = connected_ok.load(Ordering::SeqCst);
    report.errors = errors.into_iter().collect();
    print_json(&report);
    ensure!(
        report.all_ok(),
        "{} of {} connections failed",
        report.count - report.ok,
        report.count
    );
    Ok(())
}

/// One connection's protocol run: returns whether its local end was a loopback address.
fn transfer(mut s: TcpStream, req: Request, dialed: SocketAddr) -> Result<bool> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let peer = s.peer_addr().context("getpeername")?;
    ensure!(
        addr_text(peer) == addr_text(dialed),
        "getpeername shows {peer}, not the address dialed"
    );
    let loopback = s.local_addr()?.ip().to_canonical().is_loopback();

    // Small enough for the socket buffers: send everything, then read everything.
    let mut up = Pattern::new(req.seed, Direction::Up);
    let upload = up.next_chunk(req.up_len as usize).to_vec();
    let up_sha: [u8; 32] = Sha256::digest(&upload).into();
    let mut msg = req.encode().to_vec();
    msg.extend_from_slice(&upload);
    std::io::Write::write_all(&mut s, &msg).context("sending the request and upload")?;

    read_response_header(&mut s).context("reading the response header")?;
    let got = receive(
        &mut s,
        req.down_len,
        Pattern::new(req.seed, Direction::Down),
        None,
        &AtomicU64::new(0),
    )
    .context("receiving the download")?;
    let mut trailer = [0u8; TRAILER_LEN];
    std::io::Read::read_exact(&mut s, &mut trailer).context("reading the trailer")?;
    ensure!(
        got.mismatch_at.is_none(),
        "download differs from the pattern"
    );
    ensure!(
        trailer[..32] == up_sha,
        "the server received other upload bytes"
    );
    ensure!(
        trailer[32..] == got.sha256,
        "download sha256 differs from the server's"
    );
    s.shutdown(Shutdown::Write)?;
    expect_eof(&mut s)?;
    Ok(loopback)
}

/// A storm needs a descriptor per connection: lift the soft limit to the hard one, and say so
/// when even that is too low.
fn raise_nofile_limit(count: u64) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid pointer to an initialized rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    ensure!(
        lim.rlim_cur >= count + 64,
        "the open-file limit {} is too low for {count} connections",
        lim.rlim_cur
    );
    Ok(())
}
