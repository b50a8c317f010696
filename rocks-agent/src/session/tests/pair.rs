//! `Pair`: a client and a server agent driven through simulated TCP transports with a virtual
//! clock, in the manner of quinn-proto's test pair. Each `Wire` is one TCP connection:
//! ordered, reliable, with latency, until a fault (cut, black hole, injected bytes) hits it.
//! The harness plays the drivers on both sides exactly as the `session` module docs say.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use crate::{
    secret::Secret,
    session::{Accept, Accepted, Config, Event, HandshakeError, OpenError, Session, Transmit, TransportId},
};

pub(crate) const DST: &str = "192.0.2.7:8080";

#[derive(Debug)]
pub(crate) enum ServerEnd {
    /// TCP connect in progress.
    Connecting,
    Accept(Box<Accept>),
    Session(TransportId),
    /// A session created by a replayed `Open` (index into `Pair::rogues`).
    Rogue(usize, TransportId),
    Closed,
}

#[derive(Debug)]
enum Packet {
    Data(Instant, Bytes),
    Eof(Instant),
}

impl Packet {
    fn at(&self) -> Instant {
        match self {
            Packet::Data(t, _) | Packet::Eof(t) => *t,
        }
    }
}

#[derive(Debug)]
pub(crate) struct Wire {
    pub client_tid: TransportId,
    pub server: ServerEnd,
    to_server: VecDeque<Packet>,
    to_client: VecDeque<Packet>,
    /// Everything written is silently dropped (a dead path, no notification).
    pub black_hole: bool,
    /// The client's TCP connect completes at this time.
    connect_at: Option<Instant>,
    pub client_open: bool,
    /// When each direction's link is free again (serialization at `Pair::bandwidth`).
    to_server_free: Option<Instant>,
    to_client_free: Option<Instant>,
    /// Every byte the client ever wrote on it (for replay injection).
    pub client_wrote: Vec<u8>,
    pub server_wrote: Vec<u8>,
}

impl Wire {
    fn new(client_tid: TransportId, server: ServerEnd) -> Wire {
        Wire {
            client_tid,
            server,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            black_hole: false,
            connect_at: None,
            client_open: true,
            to_server_free: None,
            to_client_free: None,
            client_wrote: Vec::new(),
            server_wrote: Vec::new(),
        }
    }
}

/// One agent plus its app, as seen by the harness.
#[derive(Debug, Default)]
pub(crate) struct Side {
    pub session: Option<Session>,
    pub events: Vec<(Instant, Event)>,
    /// The app's whole outgoing stream; `sent` of it was accepted by `send`.
    pub app_out: Vec<u8>,
    pub sent: usize,
    /// Call `finish` once `app_out` is fully sent.
    pub finish_after_send: bool,
    pub finished: bool,
    /// Everything `recv` returned, in order.
    pub received: Vec<u8>,
    /// The app reads (false: a stalled app, for flow-control tests).
    pub reading: bool,
    /// Max bytes per `send` call (random chunking of app writes).
    pub write_chunk: usize,
    /// How much had been received when `PeerFinished` came (must be everything).
    pub received_at_fin: Option<usize>,
}

impl Side {
    fn new() -> Side {
        Side { reading: true, write_chunk: 64 << 10, ..Side::default() }
    }

    pub fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| pred(e)).count()
    }

    pub fn has(&self, pred: impl Fn(&Event) -> bool) -> bool {
        self.count(pred) > 0
    }

    pub fn s(&mut self) -> &mut Session {
        self.session.as_mut().expect("session exists")
    }
}

pub(crate) struct Pair {
    pub start: Instant,
    pub now: Instant,
    pub latency: Duration,
    pub server_config: Config,
    pub server_secret: Secret,
    pub client: Side,
    pub server: Side,
    pub wires: Vec<Wire>,
    /// No path between the hosts: writes are lost and new connects hang.
    pub net_down: bool,
    /// The server agent refuses connections (e.g. restarting).
    pub refuse_connects: bool,
    /// Server-side handshake failures reported by `Accept`.
    pub accept_errors: Vec<HandshakeError>,
    /// What the server driver answers after connecting to the destination.
    pub open_answer: Result<(), OpenError>,
    /// Split deliveries into random pieces (any chunking must work).
    pub rng: StdRng,
    pub random_chunks: bool,
    /// Transmits the client emitted.
    pub transmits: u64,
    /// Bytes per second per direction and transport (None: unlimited).
    pub bandwidth: Option<u64>,
    /// Server sessions created by replayed `Open` messages, with their events. They must
    /// never become established.
    pub rogues: Vec<(Session, Vec<Event>)>,
}

/// With a bandwidth limit, a write travels as segments, each arriving when it is through
/// (so the first bytes of a big write arrive first, as with TCP).
fn segments(mut data: Bytes, bandwidth: Option<u64>) -> Vec<Bytes> {
    const SEGMENT: usize = 4096;
    if bandwidth.is_none() {
        return vec![data];
    }
    let mut out = Vec::new();
    while data.len() > SEGMENT {
        out.push(data.split_to(SEGMENT));
    }
    out.push(data);
    out
}

/// When bytes written now arrive: after queueing behind earlier bytes at `bandwidth`, plus
/// the latency.
fn arrival(now: Instant, len: usize, latency: Duration, bandwidth: Option<u64>, free: &mut Option<Instant>) -> Instant {
    let Some(bw) = bandwidth else { return now + latency };
    let start = free.map_or(now, |f| f.max(now));
    let done = start + Duration::from_nanos(len as u64 * 1_000_000_000 / bw.max(1));
    *free = Some(done);
    done + latency
}

impl Pair {
    pub fn new(config: Config) -> Pair {
        Pair::with_secrets(config.clone(), config, Secret::from_bytes([42; 32]), Secret::from_bytes([42; 32]), 0)
    }

    pub fn seeded(config: Config, seed: u64) -> Pair {
        Pair::with_secrets(config.clone(), config, Secret::from_bytes([42; 32]), Secret::from_bytes([42; 32]), seed)
    }

    /// A pair whose client has already connected its first transport (handshake not run).
    pub fn with_secrets(
        client_config: Config,
        server_config: Config,
        client_secret: Secret,
        server_secret: Secret,
        seed: u64,
    ) -> Pair {
        let start = Instant::now();
        let dst: SocketAddr = DST.parse().unwrap();
        let session = Session::connect(start, client_config, &client_secret, dst);
        let first = session.first_transport();
        let accept = Accept::new(start, server_config.clone(), &server_secret);
        let mut client = Side::new();
        client.session = Some(session);
        Pair {
            start,
            now: start,
            latency: Duration::from_millis(10),
            server_config,
            server_secret,
            client,
            server: Side::new(),
            wires: vec![Wire::new(first, ServerEnd::Accept(Box::new(accept)))],
            net_down: false,
            refuse_connects: false,
            accept_errors: Vec::new(),
            open_answer: Ok(()),
            rng: StdRng::seed_from_u64(seed),
            random_chunks: false,
            transmits: 0,
            bandwidth: None,
            rogues: Vec::new(),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    pub fn c(&mut self) -> &mut Session {
        self.client.s()
    }

    pub fn srv(&mut self) -> &mut Session {
        self.server.s()
    }

    /// Index of the wire currently carrying the client's session.
    pub fn client_wire(&self) -> Option<usize> {
        let t = self.client.session.as_ref()?.active_transport()?;
        self.wires.iter().position(|w| w.client_tid == t)
    }

    pub fn server_wire(&self) -> Option<usize> {
        let t = self.server.session.as_ref()?.active_transport()?;
        self.wires.iter().position(|w| matches!(w.server, ServerEnd::Session(x) if x == t))
    }

    // ---- faults -----------------------------------------------------------------------------

    /// The connection dies: bytes in flight are lost; each end learns of it (an RST or a
    /// local error) only if told to.
    pub fn cut(&mut self, wire: usize, notify_client: bool, notify_server: bool) {
        let now = self.now;
        let w = &mut self.wires[wire];
        w.to_server.clear();
        w.to_client.clear();
        w.black_hole = true;
        if notify_client && w.client_open {
            w.client_open = false;
            let t = w.client_tid;
            if let Some(s) = self.client.session.as_mut() {
                s.transport_lost(now, t);
            }
        }
        if notify_server {
            self.server_eof(wire);
        }
    }

    /// The path goes silent: no bytes pass either way, nobody is told.
    pub fn black_hole(&mut self, wire: usize) {
        let w = &mut self.wires[wire];
        w.to_server.clear();
        w.to_client.clear();
        w.black_hole = true;
    }

    pub fn inject_to_server(&mut self, wire: usize, bytes: &[u8]) {
        let at = self.now + self.latency;
        self.wires[wire].to_server.push_back(Packet::Data(at, Bytes::copy_from_slice(bytes)));
    }

    pub fn inject_to_client(&mut self, wire: usize, bytes: &[u8]) {
        let at = self.now + self.latency;
        self.wires[wire].to_client.push_back(Packet::Data(at, Bytes::copy_from_slice(bytes)));
    }

    /// Flips one bit in the next bytes in flight towards the client (if any). Returns whether
    /// something was corrupted.
    pub fn flip_bit_to_client(&mut self, wire: usize, index: usize) -> bool {
        let Some(Packet::Data(_, data)) = self.wires[wire].to_client.iter_mut().find(|p| matches!(p, Packet::Data(..)))
        else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        let mut v = data.to_vec();
        let i = index % v.len();
        v[i] ^= 0x10;
        *data = Bytes::from(v);
        true
    }

    pub fn flip_bit_to_server(&mut self, wire: usize, index: usize) -> bool {
        let Some(Packet::Data(_, data)) = self.wires[wire].to_server.iter_mut().find(|p| matches!(p, Packet::Data(..)))
        else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        let mut v = data.to_vec();
        let i = index % v.len();
        v[i] ^= 0x10;
        *data = Bytes::from(v);
        true
    }

    /// A new raw connection from an attacker to the server (no client session behind it).
    pub fn attacker_connect(&mut self, bytes: &[u8]) -> usize {
        let accept = Accept::new(self.now, self.server_config.clone(), &self.server_secret);
        let mut w = Wire::new(TransportId(u64::MAX), ServerEnd::Accept(Box::new(accept)));
        w.client_open = false;
        w.to_server.push_back(Packet::Data(self.now + self.latency, Bytes::copy_from_slice(bytes)));
        self.wires.push(w);
        self.wires.len() - 1
    }

    fn server_eof(&mut self, wire: usize) {
        let now = self.now;
        let w = &mut self.wires[wire];
        match std::mem::replace(&mut w.server, ServerEnd::Closed) {
            ServerEnd::Accept(mut a) => {
                a.transport_lost();
                self.poll_accept(wire, a);
                self.wires[wire].server = ServerEnd::Closed;
            }
            ServerEnd::Session(t) => {
                if let Some(s) = self.server.session.as_mut() {
                    s.transport_lost(now, t);
                }
            }
            ServerEnd::Rogue(i, t) => self.rogues[i].0.transport_lost(now, t),
            ServerEnd::Connecting | ServerEnd::Closed => {}
        }
    }

    // ---- the drivers ------------------------------------------------------------------------

    /// Moves everything that can move without time passing.
    fn flush(&mut self) {
        for _ in 0..100_000 {
            let mut progress = false;
            progress |= self.app_io();
            progress |= self.transmit();
            progress |= self.events();
            if !progress {
                return;
            }
        }
        panic!("no quiescence: a busy loop in the core or the harness");
    }

    fn app_io(&mut self) -> bool {
        let mut progress = false;
        for side in [&mut self.client, &mut self.server] {
            let Some(s) = side.session.as_mut() else { continue };
            while side.sent < side.app_out.len() {
                let end = (side.sent + side.write_chunk).min(side.app_out.len());
                let n = s.send(&side.app_out[side.sent..end]);
                if n == 0 {
                    break;
                }
                side.sent += n;
                progress = true;
            }
            if side.finish_after_send && !side.finished && side.sent == side.app_out.len() {
                side.finished = true;
                s.finish();
                progress = true;
            }
            if side.reading {
                while let Some(chunk) = s.recv() {
                    side.received.extend_from_slice(&chunk);
                    progress = true;
                }
            }
        }
        progress
    }

    fn transmit(&mut self) -> bool {
        let mut progress = false;
        let now = self.now;
        let at = now + self.latency;
        if let Some(s) = self.client.session.as_mut() {
            while let Some(Transmit { transport, data }) = s.poll_transmit(now) {
                progress = true;
                self.transmits += 1;
                let Some(w) = self.wires.iter_mut().find(|w| w.client_tid == transport) else {
                    panic!("client wrote to unknown transport {transport}");
                };
                assert!(w.client_open, "client wrote to {transport} after closing it; events {:?}", self.client.events);
                w.client_wrote.extend_from_slice(&data);
                if !w.black_hole && !self.net_down {
                    for seg in segments(data, self.bandwidth) {
                        let at = arrival(now, seg.len(), self.latency, self.bandwidth, &mut w.to_server_free);
                        w.to_server.push_back(Packet::Data(at, seg));
                    }
                }
            }
        }
        if let Some(s) = self.server.session.as_mut() {
            while let Some(Transmit { transport, data }) = s.poll_transmit(now) {
                progress = true;
                let Some(w) =
                    self.wires.iter_mut().find(|w| matches!(w.server, ServerEnd::Session(t) if t == transport))
                else {
                    // A refusal for an attempt whose wire the harness already closed.
                    continue;
                };
                w.server_wrote.extend_from_slice(&data);
                if !w.black_hole && !self.net_down {
                    for seg in segments(data, self.bandwidth) {
                        let at = arrival(now, seg.len(), self.latency, self.bandwidth, &mut w.to_client_free);
                        w.to_client.push_back(Packet::Data(at, seg));
                    }
                }
            }
        }
        for (r, (s, _)) in self.rogues.iter_mut().enumerate() {
            while let Some(Transmit { transport, data }) = s.poll_transmit(now) {
                progress = true;
                if let Some(w) = self
                    .wires
                    .iter_mut()
                    .find(|w| matches!(w.server, ServerEnd::Rogue(x, t) if x == r && t == transport))
                    && !w.black_hole
                    && !self.net_down
                {
                    w.to_client.push_back(Packet::Data(at, data));
                }
            }
        }
        for i in 0..self.wires.len() {
            if let ServerEnd::Accept(a) = &mut self.wires[i].server
                && let Some(data) = a.poll_transmit()
            {
                progress = true;
                let w = &mut self.wires[i];
                w.server_wrote.extend_from_slice(&data);
                if !w.black_hole && !self.net_down {
                    w.to_client.push_back(Packet::Data(at, data));
                }
            }
        }
        progress
    }

    fn events(&mut self) -> bool {
        let mut progress = false;
        let now = self.now;
        let at = now + self.latency;
        while let Some(e) = self.client.session.as_mut().and_then(Session::poll_event) {
            progress = true;
            match &e {
                Event::TransportClosed { transport, .. } => {
                    if let Some(w) = self.wires.iter_mut().find(|w| w.client_tid == *transport)
                        && w.client_open
                    {
                        w.client_open = false;
                        w.connect_at = None;
                        if !w.black_hole && !self.net_down {
                            w.to_server.push_back(Packet::Eof(at));
                        }
                    }
                }
                Event::Reconnect { transport } => {
                    let mut w = Wire::new(*transport, ServerEnd::Connecting);
                    w.connect_at = Some(now + self.latency * 2);
                    self.wires.push(w);
                }
                Event::PeerFinished => self.client.received_at_fin = Some(self.client.received.len()),
                _ => {}
            }
            self.client.events.push((now, e));
        }
        while let Some(e) = self.server.session.as_mut().and_then(Session::poll_event) {
            progress = true;
            if let Event::TransportClosed { transport, .. } = &e
                && let Some(w) =
                    self.wires.iter_mut().find(|w| matches!(w.server, ServerEnd::Session(t) if t == *transport))
            {
                w.server = ServerEnd::Closed;
                if !w.black_hole && !self.net_down {
                    w.to_client.push_back(Packet::Eof(at));
                }
            }
            if e == Event::PeerFinished {
                self.server.received_at_fin = Some(self.server.received.len());
            }
            if let Event::Established { .. } = e {
                // Only now does the server driver connect to the destination.
                let answer = self.open_answer;
                self.server.events.push((now, e));
                self.srv().open_result(answer);
                continue;
            }
            self.server.events.push((now, e));
        }
        for (r, (s, events)) in self.rogues.iter_mut().enumerate() {
            while let Some(e) = s.poll_event() {
                progress = true;
                if let Event::TransportClosed { transport, .. } = &e
                    && let Some(w) = self
                        .wires
                        .iter_mut()
                        .find(|w| matches!(w.server, ServerEnd::Rogue(x, t) if x == r && t == *transport))
                {
                    w.server = ServerEnd::Closed;
                }
                events.push(e);
            }
        }
        progress
    }

    /// Acts on an `Accept`'s outcome, or puts it back.
    fn poll_accept(&mut self, wire: usize, mut accept: Box<Accept>) {
        let now = self.now;
        let at = now + self.latency;
        if let Some(data) = accept.poll_transmit() {
            let w = &mut self.wires[wire];
            w.server_wrote.extend_from_slice(&data);
            if !w.black_hole && !self.net_down {
                w.to_client.push_back(Packet::Data(at, data));
            }
        }
        match accept.poll_outcome() {
            None => self.wires[wire].server = ServerEnd::Accept(accept),
            Some(Err(e)) => {
                self.accept_errors.push(e);
                let w = &mut self.wires[wire];
                w.server = ServerEnd::Closed;
                if !w.black_hole && !self.net_down {
                    w.to_client.push_back(Packet::Eof(at));
                }
            }
            Some(Ok(Accepted::New { session, dst })) => {
                assert_eq!(dst, DST.parse().unwrap());
                let t = session.first_transport();
                if self.server.session.is_none() && wire == 0 {
                    self.server.session = Some(session);
                    self.wires[wire].server = ServerEnd::Session(t);
                } else {
                    self.rogues.push((session, Vec::new()));
                    self.wires[wire].server = ServerEnd::Rogue(self.rogues.len() - 1, t);
                }
            }
            Some(Ok(Accepted::Resume { session_id, attempt })) => match self.server.session.as_mut() {
                Some(s) if s.id() == Some(session_id) => {
                    let t = s.accept_resume(now, attempt);
                    self.wires[wire].server = ServerEnd::Session(t);
                }
                _ => {
                    let data = attempt.refuse();
                    let w = &mut self.wires[wire];
                    w.server_wrote.extend_from_slice(&data);
                    w.server = ServerEnd::Closed;
                    if !w.black_hole && !self.net_down {
                        w.to_client.push_back(Packet::Data(at, data));
                        w.to_client.push_back(Packet::Eof(at));
                    }
                }
            },
        }
    }

    fn next_time(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        for w in &self.wires {
            consider(w.to_server.front().map(Packet::at));
            consider(w.to_client.front().map(Packet::at));
            consider(w.connect_at);
            if let ServerEnd::Accept(a) = &w.server {
                consider(a.poll_timeout());
            }
        }
        consider(self.client.session.as_ref().and_then(Session::poll_timeout));
        consider(self.server.session.as_ref().and_then(Session::poll_timeout));
        for (s, _) in &self.rogues {
            consider(s.poll_timeout());
        }
        next
    }

    /// Splits `data` into random pieces when random chunking is on.
    fn pieces(&mut self, data: Bytes) -> Vec<Bytes> {
        if !self.random_chunks || data.len() < 2 {
            return vec![data];
        }
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            let n = self.rng.random_range(1..=rest.len());
            out.push(rest.split_to(n));
        }
        out
    }

    /// Advances the clock to the next thing that happens, never past `limit`.
    fn step(&mut self, limit: Instant) -> bool {
        self.flush();
        let Some(next) = self.next_time() else { return false };
        if next > limit {
            self.now = limit;
            return false;
        }
        self.now = self.now.max(next);
        let now = self.now;
        for i in 0..self.wires.len() {
            // Client TCP connect completing.
            if self.wires[i].connect_at.is_some_and(|t| t <= now) {
                self.wires[i].connect_at = None;
                let t = self.wires[i].client_tid;
                if self.net_down {
                    // The SYN is lost; the core times the attempt out.
                    self.wires[i].black_hole = true;
                } else if self.refuse_connects {
                    self.wires[i].client_open = false;
                    self.wires[i].server = ServerEnd::Closed;
                    self.c().transport_lost(now, t);
                } else {
                    let accept = Accept::new(now, self.server_config.clone(), &self.server_secret);
                    self.wires[i].server = ServerEnd::Accept(Box::new(accept));
                    self.c().start_resume(now, t);
                }
            }
            while self.wires[i].to_server.front().is_some_and(|p| p.at() <= now) {
                let p = self.wires[i].to_server.pop_front().expect("front exists");
                match p {
                    Packet::Data(_, data) => {
                        for piece in self.pieces(data) {
                            self.deliver_to_server(i, &piece);
                        }
                    }
                    Packet::Eof(_) => self.server_eof(i),
                }
            }
            while self.wires[i].to_client.front().is_some_and(|p| p.at() <= now) {
                let p = self.wires[i].to_client.pop_front().expect("front exists");
                let w = &mut self.wires[i];
                if !w.client_open {
                    continue;
                }
                let t = w.client_tid;
                match p {
                    Packet::Data(_, data) => {
                        for piece in self.pieces(data) {
                            self.c().handle_input(now, t, &piece);
                        }
                    }
                    Packet::Eof(_) => {
                        self.wires[i].client_open = false;
                        self.c().transport_lost(now, t);
                    }
                }
            }
            if let ServerEnd::Accept(a) = &mut self.wires[i].server
                && a.poll_timeout().is_some_and(|t| t <= now)
            {
                a.handle_timeout(now);
                let ServerEnd::Accept(a) = std::mem::replace(&mut self.wires[i].server, ServerEnd::Closed) else {
                    unreachable!()
                };
                self.poll_accept(i, a);
            }
        }
        for side in [&mut self.client, &mut self.server] {
            if let Some(s) = side.session.as_mut()
                && s.poll_timeout().is_some_and(|t| t <= now)
            {
                s.handle_timeout(now);
            }
        }
        for (s, _) in &mut self.rogues {
            if s.poll_timeout().is_some_and(|t| t <= now) {
                s.handle_timeout(now);
            }
        }
        true
    }

    fn deliver_to_server(&mut self, wire: usize, bytes: &[u8]) {
        let now = self.now;
        match std::mem::replace(&mut self.wires[wire].server, ServerEnd::Closed) {
            ServerEnd::Accept(mut a) => {
                a.handle_input(now, bytes);
                self.poll_accept(wire, a);
            }
            ServerEnd::Session(t) => {
                self.wires[wire].server = ServerEnd::Session(t);
                self.srv().handle_input(now, t, bytes);
            }
            ServerEnd::Rogue(i, t) => {
                self.wires[wire].server = ServerEnd::Rogue(i, t);
                self.rogues[i].0.handle_input(now, t, bytes);
            }
            other => self.wires[wire].server = other,
        }
    }

    /// Runs for `d` of virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let limit = self.now + d;
        while self.step(limit) {}
        self.flush();
    }

    /// Runs until `cond` holds (checked after every step); false if `d` passed first.
    pub fn run_until(&mut self, d: Duration, mut cond: impl FnMut(&Pair) -> bool) -> bool {
        let limit = self.now + d;
        loop {
            self.flush();
            if cond(self) {
                return true;
            }
            if !self.step(limit) {
                self.flush();
                return cond(self);
            }
        }
    }

    /// Runs the initial handshake to `Established` + `Opened`.
    pub fn connect(&mut self) {
        let ok = self.run_until(Duration::from_secs(1), |p| {
            p.client.has(|e| matches!(e, Event::Opened)) && p.server.session.is_some()
        });
        assert!(
            ok,
            "connect failed: client {:?} server {:?} accept {:?}",
            self.client.events, self.server.events, self.accept_errors
        );
    }
}
