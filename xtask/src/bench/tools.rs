//! The small programs the bench runs inside its hosts: servers on host b (and c) and the
//! measuring clients on host a. They are this same binary (`xtask bench <helper> ...`,
//! hidden from `--help`), started in a namespace and cgroup by [`super::lab::Lab::helper`].
//! Each prints its results on stdout, one line at a time, timestamps in CLOCK_MONOTONIC
//! nanoseconds, which the bench process reads too.

use std::{
    collections::HashMap,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, RawFd},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    libc,
    sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    },
};

use super::lab::monotonic_ns;

#[derive(clap::Subcommand)]
pub enum Helper {
    /// A TCP server on 0.0.0.0:PORT.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        port: u16,
        /// `echo`: sends back what it reads (a thread per connection); `greet`: sends one
        /// byte on accept, then discards input until the peer closes (one thread for all, so
        /// it holds tens of thousands of connections); `udp`: a UDP echo server.
        #[arg(long)]
        mode: String,
    },
    /// Request/response: COUNT times, send SIZE bytes and wait for them to come back.
    #[command(hide = true)]
    Pingpong {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        size: usize,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 200)]
        warmup: usize,
    },
    /// Connect-to-first-byte time of one fresh connection to each ADDR, in order.
    #[command(hide = true)]
    Setup {
        #[arg(long, num_args = 1..)]
        addr: Vec<SocketAddr>,
        #[arg(long, default_value_t = 20)]
        pause_ms: u64,
    },
    /// One byte there and back every INTERVAL on one connection, until killed; prints the
    /// time each answer arrived.
    #[command(hide = true)]
    Ticker {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
    },
    /// A UDP datagram to ADDR every INTERVAL, until killed; prints the time each answer
    /// arrived. Not a connection, so it shows when the path itself works again.
    #[command(hide = true)]
    Probe {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
    },
    /// Opens COUNT connections to a greeting server and holds them until killed.
    #[command(hide = true)]
    Hold {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
}

pub fn run(helper: Helper) -> Result<()> {
    match helper {
        Helper::Serve { port, mode } => match mode.as_str() {
            "echo" => serve_echo(listener(port)?),
            "greet" => serve_greet(listener(port)?),
            "udp" => serve_udp(port),
            other => bail!("unknown mode {other:?}"),
        },
        Helper::Pingpong {
            addr,
            size,
            count,
            warmup,
        } => pingpong(addr, size, count, warmup),
        Helper::Setup { addr, pause_ms } => setup(&addr, Duration::from_millis(pause_ms)),
        Helper::Ticker { addr, interval_us } => ticker(addr, interval_us),
        Helper::Probe { addr, interval_us } => probe(addr, interval_us),
        Helper::Hold {
            addr,
            count,
            threads,
        } => hold(addr, count, threads),
    }
}

/// A listener with a deep backlog (std's is 128), for bursts of thousands of connects.
fn listener(port: u16) -> Result<TcpListener> {
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
    )
    .with_context(|| format!("binding port {port}"))?;
    listen(&fd, Backlog::new(4096)?)?;
    Ok(TcpListener::from(fd))
}

fn serve_echo(listener: TcpListener) -> Result<()> {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        thread::spawn(move || {
            let mut buf = vec![0u8; 256 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

fn serve_greet(listener: TcpListener) -> Result<()> {
    listener.set_nonblocking(true)?;
    // SAFETY: plain epoll syscalls on descriptors this function owns.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(std::io::Error::last_os_error()).context("epoll_create1");
    }
    let add = |fd: RawFd| -> Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        // SAFETY: `event` lives across the call.
        if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut event) } < 0 {
            return Err(std::io::Error::last_os_error()).context("epoll_ctl");
        }
        Ok(())
    };
    let listen_fd = listener.as_raw_fd();
    add(listen_fd)?;
    let mut conns: HashMap<RawFd, TcpStream> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut buf = [0u8; 16 << 10];
    let mut accepted = 0u64;
    loop {
        // SAFETY: `events` has room for the number of events asked for.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("epoll_wait");
        }
        for event in &events[..n as usize] {
            let fd = event.u64 as RawFd;
            if fd == listen_fd {
                loop {
                    match listener.accept() {
                        Ok((mut stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            // Accepted sockets are blocking: the one byte goes out at once.
                            let _ = stream.write_all(b"!");
                            stream.set_nonblocking(true)?;
                            add(stream.as_raw_fd())?;
                            conns.insert(stream.as_raw_fd(), stream);
                            accepted += 1;
                            if accepted.is_multiple_of(1000) {
                                println!("accepted {accepted}, holding {}", conns.len());
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => {
                            eprintln!("accept: {e}");
                            thread::sleep(Duration::from_millis(10));
                            break;
                        }
                    }
                }
                continue;
            }
            let Some(stream) = conns.get_mut(&fd) else {
                continue;
            };
            let closed = loop {
                match stream.read(&mut buf) {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            if closed {
                // Closing the descriptor also takes it out of the epoll set.
                conns.remove(&fd);
            }
        }
    }
}

fn pingpong(addr: SocketAddr, size: usize, count: usize, warmup: usize) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let message = vec![0x5a; size];
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let start = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        let took = start.elapsed();
        if i >= warmup {
            samples.push(took.as_nanos().to_string());
        }
    }
    println!("samples_ns {}", samples.join(" "));
    Ok(())
}

fn setup(addrs: &[SocketAddr], pause: Duration) -> Result<()> {
    for addr in addrs {
        let start = Instant::now();
        let mut stream = TcpStream::connect_timeout(addr, Duration::from_secs(10))
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut first = [0u8; 1];
        stream
            .read_exact(&mut first)
            .with_context(|| format!("reading the first byte from {addr}"))?;
        let took = start.elapsed();
        println!("{addr} {}", took.as_nanos());
        drop(stream);
        thread::sleep(pause);
    }
    Ok(())
}

fn ticker(addr: SocketAddr, interval_us: u64) -> Result<()> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let interval = Duration::from_micros(interval_us);
    let mut byte = [0u8; 1];
    let mut stdout = std::io::stdout();
    loop {
        stream.write_all(b"t").context("sending")?;
        stream.read_exact(&mut byte).context("receiving")?;
        writeln!(stdout, "t {}", monotonic_ns())?;
        stdout.flush()?;
        thread::sleep(interval);
    }
}

fn serve_udp(port: u16) -> Result<()> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], from);
    }
}

fn probe(addr: SocketAddr, interval_us: u64) -> Result<()> {
    // Not connected: the source address is chosen afresh for every datagram, so the probe
    // follows an address change.
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    let interval = Duration::from_micros(interval_us);
    socket.set_read_timeout(Some(interval))?;
    let mut buf = [0u8; 64];
    let mut stdout = std::io::stdout();
    loop {
        // Fails while the link is down or the address is gone; that is what is probed.
        let _ = socket.send_to(b"probe", addr);
        let deadline = Instant::now() + interval;
        while Instant::now() < deadline {
            if socket.recv_from(&mut buf).is_ok() {
                writeln!(stdout, "u {}", monotonic_ns())?;
                stdout.flush()?;
            }
        }
    }
}

fn hold(addr: SocketAddr, count: usize, threads: usize) -> Result<()> {
    let threads = threads.clamp(1, count.max(1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let share = count / threads + usize::from(t < count % threads);
            thread::spawn(move || -> Result<Vec<TcpStream>> {
                let mut held = Vec::with_capacity(share);
                for _ in 0..share {
                    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                        .with_context(|| format!("connection {} to {addr}", held.len() + 1))?;
                    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
                    let mut first = [0u8; 1];
                    stream.read_exact(&mut first).with_context(|| {
                        format!("the greeting on connection {} to {addr}", held.len() + 1)
                    })?;
                    held.push(stream);
                }
                Ok(held)
            })
        })
        .collect();
    let mut held = Vec::with_capacity(count);
    for handle in handles {
        match handle.join() {
            Ok(streams) => held.extend(streams?),
            Err(_) => bail!("a connecting thread panicked"),
        }
    }
    println!("ready {}", held.len());
    std::io::stdout().flush()?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
