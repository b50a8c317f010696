//! The non-resume path: handshake, open, data both ways, acks, fin, reset, heartbeats, dead
//! detection, handshake errors.

use std::time::Duration;

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

use super::pair::Pair;
use crate::{
    secret::Secret,
    session::{Accept, CloseReason, Config, Event, HandshakeError, OpenError, RejectReason, SessionError, State, wire},
};

pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

#[test]
fn connect_exchange_finish_close() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let id = p.client.session.as_ref().unwrap().id().unwrap();
    assert_eq!(p.server.session.as_ref().unwrap().id(), Some(id));
    assert!(p.client.has(|e| *e == Event::Established { id }));
    assert!(p.server.has(|e| *e == Event::Established { id }));

    p.client.app_out = pattern(3 << 20, 1);
    p.server.app_out = pattern(1 << 20, 2);
    p.client.finish_after_send = true;
    p.server.finish_after_send = true;
    let done = p.run_until(Duration::from_secs(30), |p| {
        p.client.has(|e| *e == Event::Closed) && p.server.has(|e| *e == Event::Closed)
    });
    assert!(done, "client {:?}\nserver {:?}", p.client.events, p.server.events);
    assert!(p.client.received == p.server.app_out, "server->client stream differs");
    assert!(p.server.received == p.client.app_out, "client->server stream differs");
    for side in [&p.client, &p.server] {
        assert_eq!(side.count(|e| *e == Event::PeerFinished), 1);
        assert_eq!(side.count(|e| *e == Event::Closed), 1);
        assert_eq!(side.count(|e| matches!(e, Event::Suspended)), 0);
        assert_eq!(side.session.as_ref().unwrap().state(), State::Closed);
        assert_eq!(side.session.as_ref().unwrap().stats().buffered, 0);
    }
    // Transports are released on both sides (the client may see the server's EOF first).
    assert!(p.server.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::SessionEnded, .. })));
    assert!(p.client.has(|e| matches!(e, Event::TransportClosed { .. })));
    let stats = p.client.session.as_ref().unwrap().stats();
    assert_eq!(stats.bytes_sent, 3 << 20);
    assert_eq!(stats.bytes_received, 1 << 20);
}

#[test]
fn half_close_keeps_the_other_direction_open() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.client.app_out = b"request".to_vec();
    p.client.finish_after_send = true;
    assert!(p.run_until(Duration::from_secs(1), |p| p.server.has(|e| *e == Event::PeerFinished)));
    assert_eq!(p.server.received, b"request");
    // The server keeps talking long after the client's fin.
    p.run_for(Duration::from_secs(5));
    p.server.app_out = pattern(200_000, 3);
    p.server.finish_after_send = true;
    assert!(p.run_until(Duration::from_secs(5), |p| p.client.has(|e| *e == Event::Closed)
        && p.server.has(|e| *e == Event::Closed)));
    assert!(p.client.received == p.server.app_out);
    // PeerFinished came after every byte.
    let fin_at = p.client.events.iter().position(|(_, e)| *e == Event::PeerFinished).unwrap();
    let closed_at = p.client.events.iter().position(|(_, e)| *e == Event::Closed).unwrap();
    assert!(fin_at < closed_at);
}

#[test]
fn data_sent_before_established_is_delivered() {
    let mut p = Pair::new(Config::default());
    p.client.app_out = b"early bytes".to_vec();
    p.connect();
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.server.received, b"early bytes");
}

#[test]
fn reset_reaches_the_peer() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.client.app_out = b"partial".to_vec();
    p.run_for(Duration::from_millis(50));
    p.c().reset(7);
    assert_eq!(p.c().send(b"more"), 0);
    assert!(p.run_until(Duration::from_secs(1), |p| p.server.has(|e| *e == Event::PeerReset { code: 7 })));
    assert!(p.client.has(|e| *e == Event::Closed));
    assert_eq!(p.srv().state(), State::Closed);
    assert_eq!(p.server.count(|e| e.is_terminal()), 1);
}

#[test]
fn server_reset_reaches_the_client() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.srv().reset(99);
    assert!(p.run_until(Duration::from_secs(1), |p| p.client.has(|e| *e == Event::PeerReset { code: 99 })));
}

#[test]
fn open_failure_is_reported_to_the_client() {
    let mut p = Pair::new(Config::default());
    p.open_answer = Err(OpenError::Refused);
    assert!(p.run_until(Duration::from_secs(1), |p| p.client.has(|e| *e == Event::OpenFailed(OpenError::Refused))));
    assert!(p.server.has(|e| *e == Event::Closed));
    assert_eq!(p.c().state(), State::Closed);
}

#[test]
fn idle_session_stays_up_with_heartbeats() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let before = p.transmits;
    p.run_for(Duration::from_secs(30));
    assert!(p.transmits - before >= 25, "pings flow when idle ({} transmits)", p.transmits - before);
    for side in [&p.client, &p.server] {
        assert!(!side.has(|e| matches!(e, Event::TransportClosed { .. } | Event::Suspended)), "{:?}", side.events);
    }
    // No tight timer loop: poll_timeout is in the future after handling it.
    let now = p.now;
    assert!(p.c().poll_timeout().unwrap() > now);
}

#[test]
fn black_hole_is_detected_within_dead_after() {
    let config = Config::default();
    let dead_after = config.dead_after;
    let mut p = Pair::new(config);
    p.connect();
    p.run_for(Duration::from_secs(3));
    let w = p.client_wire().unwrap();
    p.black_hole(w);
    p.net_down = true; // reconnects hang too
    let t0 = p.now;
    assert!(p.run_until(Duration::from_secs(10), |p| {
        p.client.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::Dead, .. }))
            && p.server.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::Dead, .. }))
    }));
    let took = p.now - t0;
    assert!(took <= dead_after, "dead detection took {took:?}");
    assert!(p.client.has(|e| *e == Event::Suspended));
    assert!(p.server.has(|e| *e == Event::Suspended));
    assert_eq!(p.srv().state(), State::Suspended);
}

#[test]
fn replay_buffer_full_blocks_send_until_acked() {
    let config = Config { max_buffered: 1 << 20, ..Config::default() };
    let mut p = Pair::new(config);
    p.connect();
    p.server.reading = false; // a stalled app: nothing is acknowledged
    p.client.app_out = pattern(5 << 20, 4);
    p.run_for(Duration::from_secs(10));
    assert_eq!(p.client.sent, 1 << 20, "exactly the replay buffer was taken");
    assert_eq!(p.c().send(b"x"), 0);
    assert_eq!(p.c().send_capacity(), 0);
    // Heartbeats kept the transport alive although the app did not read for 10 s.
    assert!(!p.client.has(|e| matches!(e, Event::TransportClosed { .. })), "{:?}", p.client.events);
    p.server.reading = true;
    assert!(p.run_until(Duration::from_secs(30), |p| p.server.received.len() == 5 << 20));
    assert!(p.server.received == p.client.app_out);
}

#[test]
fn the_window_bounds_everything_in_flight() {
    // Whatever the app does, the replay buffer never holds more than `max_buffered` and the
    // peer never holds more than that undelivered.
    let config = Config { max_buffered: 100_000, max_frame_data: 7_000, ..Config::default() };
    let mut p = Pair::seeded(config, 5);
    p.random_chunks = true;
    p.connect();
    p.client.app_out = pattern(2_000_000, 6);
    p.client.write_chunk = 3_333;
    for _ in 0..200 {
        p.server.reading = !p.server.reading;
        p.run_for(Duration::from_millis(37));
        let (acked, end) = p.c().unacked_window();
        assert!(end - acked <= 100_000);
        let consumed = p.srv().consumed();
        assert!(acked <= consumed, "acked {acked} beyond what the peer took {consumed}");
    }
    p.server.reading = true;
    assert!(p.run_until(Duration::from_secs(20), |p| p.server.received.len() == 2_000_000));
    assert!(p.server.received == p.client.app_out);
}

#[test]
fn wrong_secret_fails_on_both_sides() {
    let mut p = Pair::with_secrets(
        Config::default(),
        Config::default(),
        Secret::from_bytes([1; 32]),
        Secret::from_bytes([2; 32]),
        0,
    );
    assert!(p.run_until(Duration::from_secs(3), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert_eq!(p.accept_errors, vec![HandshakeError::AuthFailed]);
    assert!(
        p.client
            .has(|e| *e
                == Event::Failed(SessionError::Handshake(HandshakeError::PeerRejected(RejectReason::AuthFailed))))
    );
    let msg = HandshakeError::PeerRejected(RejectReason::AuthFailed).to_string();
    assert!(msg.contains("wrong cluster secret"), "{msg}");
    assert!(p.server.session.is_none());
    assert_eq!(p.c().state(), State::Failed);
}

#[test]
fn handshake_timeout_when_the_peer_is_silent() {
    let mut p = Pair::new(Config::default());
    p.black_hole(0);
    assert!(p.run_until(Duration::from_secs(5), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert!(p.client.has(|e| *e == Event::Failed(SessionError::Handshake(HandshakeError::Timeout))));
    assert_eq!(p.elapsed(), Config::default().handshake_timeout);
}

#[test]
fn not_a_rocks_peer_is_reported_at_once() {
    let mut p = Pair::new(Config::default());
    p.black_hole(0);
    p.wires[0].black_hole = false;
    p.inject_to_client(0, b"SSH-2.0-OpenSSH_9.6\r\n");
    assert!(p.run_until(Duration::from_millis(100), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert!(p.client.has(|e| *e == Event::Failed(SessionError::Handshake(HandshakeError::NotARocksPeer))));
    // Even a single wrong byte is enough to tell.
    let mut p = Pair::new(Config::default());
    p.black_hole(0);
    p.inject_to_client(0, b"H");
    assert!(p.run_until(Duration::from_millis(100), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
}

#[test]
fn version_mismatch_is_reported_on_both_sides() {
    // Client side: a server answering with version 2.
    let mut p = Pair::new(Config::default());
    p.black_hole(0);
    let mut pre = wire::preamble();
    pre[7] = 2;
    p.inject_to_client(0, &pre);
    assert!(p.run_until(Duration::from_millis(100), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert!(
        p.client
            .has(|e| *e
                == Event::Failed(SessionError::Handshake(HandshakeError::VersionMismatch { ours: 1, theirs: 2 })))
    );

    // Server side: a client speaking version 2 gets our preamble and a reject.
    let secret = Secret::generate();
    let now = std::time::Instant::now();
    let mut a = Accept::new(now, Config::default(), &secret);
    a.handle_input(now, &pre);
    assert_eq!(a.poll_outcome().unwrap().unwrap_err(), HandshakeError::VersionMismatch { ours: 1, theirs: 2 });
    let reply = a.poll_transmit().unwrap();
    assert_eq!(&reply[..wire::PREAMBLE_LEN], &wire::preamble());
}

#[test]
fn accept_survives_garbage_of_every_shape() {
    let secret = Secret::generate();
    let mut rng = StdRng::seed_from_u64(77);
    let now = std::time::Instant::now();
    let mut valid = wire::preamble().to_vec();
    // A record with a random body, a huge length prefix, a truncated record, empty records.
    for case in 0..2000 {
        let mut a = Accept::new(now, Config::default(), &secret);
        let mut input = if case % 2 == 0 { valid.clone() } else { Vec::new() };
        let len = rng.random_range(0..300);
        input.extend((0..len).map(|_| rng.random::<u8>()));
        if case % 7 == 0 {
            input.extend_from_slice(&[0xff, 0xff]);
        }
        for piece in input.chunks(rng.random_range(1..50)) {
            a.handle_input(now, piece);
        }
        a.handle_timeout(now + Duration::from_secs(3));
        let outcome = a.poll_outcome();
        assert!(matches!(outcome, Some(Err(_))), "case {case}: {outcome:?}");
    }
    valid.clear();
}

#[test]
fn tampered_msg2_fails_the_client_handshake() {
    let mut p = Pair::new(Config::default());
    // Let msg1 reach the server and msg2 get on its way, then flip a bit in it.
    p.run_until(Duration::from_millis(15), |p| !p.wires[0].server_wrote.is_empty());
    assert!(p.flip_bit_to_client(0, 20));
    assert!(p.run_until(Duration::from_secs(1), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert!(p.client.has(|e| *e == Event::Failed(SessionError::Handshake(HandshakeError::AuthFailed))));
    // The server's unconfirmed session never gets established and goes away by itself.
    p.run_for(Config::default().confirm_timeout);
    assert!(!p.server.has(|e| matches!(e, Event::Established { .. })));
    assert_eq!(p.srv().state(), State::Failed);
}

#[test]
fn a_backlogged_transport_gets_no_data_but_stays_alive() {
    let config = Config::default();
    let dead_after = config.dead_after;
    let mut p = Pair::new(config);
    p.connect();
    let t = p.c().first_transport();
    p.c().set_backlogged(t, true);
    p.client.app_out = pattern(256 << 10, 9);
    p.client.finish_after_send = true;
    // Longer than dead_after: pings and acks still flow, so nothing is declared dead, and
    // the application's bytes wait in the replay buffer.
    p.run_for(dead_after * 3);
    assert!(p.server.received.is_empty(), "{} bytes went out on a backlogged transport", p.server.received.len());
    assert_eq!(p.client.sent, 256 << 10, "the replay buffer took the bytes");
    assert_eq!(p.c().stats().buffered, 256 << 10);
    assert!(!p.client.has(|e| matches!(e, Event::TransportClosed { .. } | Event::Suspended)));
    assert!(!p.server.has(|e| matches!(e, Event::TransportClosed { .. } | Event::Suspended)));
    // Cleared: everything arrives, once and in order.
    p.c().set_backlogged(t, false);
    assert!(p.run_until(Duration::from_secs(5), |p| p.server.has(|e| *e == Event::PeerFinished)));
    assert!(p.server.received == p.client.app_out, "stream differs after the backlog cleared");
}
