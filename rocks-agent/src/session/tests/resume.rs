//! Resume: transports cut, silenced, superseded or attacked; the session carries on with
//! every byte delivered once, and attacks on a resume never harm the live session.

use std::time::Duration;

use bytes::BytesMut;

use super::{basic::pattern, pair::Pair};
use crate::{
    secret::Secret,
    session::{
        CloseReason, Config, Event, HandshakeError, SessionError, State, handshake,
        wire::{self, Answer, Frame, Hello},
    },
};

/// A connected pair with both directions streaming and finishing.
fn streaming(config: Config, seed: u64, client_bytes: usize, server_bytes: usize) -> Pair {
    let mut p = Pair::seeded(config, seed);
    p.connect();
    p.client.app_out = pattern(client_bytes, seed * 2 + 1);
    p.server.app_out = pattern(server_bytes, seed * 2 + 2);
    p.client.finish_after_send = true;
    p.server.finish_after_send = true;
    p
}

fn both_closed(p: &Pair) -> bool {
    p.client.has(|e| *e == Event::Closed) && p.server.has(|e| *e == Event::Closed)
}

fn assert_complete(p: &Pair) {
    assert!(
        p.client.received == p.server.app_out,
        "server->client: got {} of {}",
        p.client.received.len(),
        p.server.app_out.len()
    );
    assert!(
        p.server.received == p.client.app_out,
        "client->server: got {} of {}",
        p.server.received.len(),
        p.client.app_out.len()
    );
    for side in [&p.client, &p.server] {
        assert_eq!(side.count(|e| *e == Event::PeerFinished), 1, "{:?}", side.events);
        assert_eq!(side.count(|e| *e == Event::Closed), 1, "{:?}", side.events);
        assert_eq!(side.count(|e| e.is_terminal()), 1, "{:?}", side.events);
    }
}

/// Small frames and buffers so a transfer spans many round trips.
fn small() -> Config {
    Config { max_buffered: 64 << 10, max_frame_data: 4 << 10, ..Config::default() }
}

#[test]
fn cut_with_notification_resumes_and_delivers_exactly_once() {
    let mut p = streaming(small(), 1, 2 << 20, 2 << 20);
    p.run_for(Duration::from_millis(100));
    assert!(p.server.received.len() < 2 << 20, "the cut must land mid-transfer");
    let w = p.client_wire().unwrap();
    p.cut(w, true, true);
    assert!(p.run_until(Duration::from_secs(60), both_closed));
    assert_complete(&p);
    for side in [&p.client, &p.server] {
        assert_eq!(side.count(|e| matches!(e, Event::Resumed { .. })), 1, "{:?}", side.events);
        assert_eq!(side.count(|e| *e == Event::Suspended), 1);
    }
    assert_eq!(p.c().stats().resumes, 1);
    // Back-off: the first reconnect is immediate.
    let lost_at = p.client.events.iter().find(|(_, e)| *e == Event::Suspended).unwrap().0;
    let reconnect_at = p.client.events.iter().find(|(_, e)| matches!(e, Event::Reconnect { .. })).unwrap().0;
    assert_eq!(lost_at, reconnect_at);
}

#[test]
fn silent_path_is_detected_and_resumed() {
    let mut p = streaming(small(), 2, 1 << 20, 1 << 20);
    p.run_for(Duration::from_millis(100));
    let w = p.client_wire().unwrap();
    p.black_hole(w);
    assert!(p.run_until(Duration::from_secs(60), both_closed));
    assert_complete(&p);
    assert!(p.client.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::Dead, .. })));
    let took = p.c().stats().last_resume_took.unwrap();
    assert!(took < Duration::from_secs(1), "resumed {took:?} after the dead detection");
}

#[test]
fn outage_then_resume_with_backoff() {
    let mut p = streaming(Config::default(), 3, 300_000, 300_000);
    p.run_for(Duration::from_millis(15));
    let w = p.client_wire().unwrap();
    p.black_hole(w);
    p.net_down = true;
    p.run_for(Duration::from_secs(30));
    assert_eq!(p.c().state(), State::Suspended);
    // Attempts back off to the cap: 30 s of outage allow roughly one attempt per
    // (handshake timeout + 2 s cap), not hundreds.
    let attempts = p.client.count(|e| matches!(e, Event::Reconnect { .. }));
    assert!((5..=15).contains(&attempts), "{attempts} attempts");
    p.net_down = false;
    assert!(p.run_until(Duration::from_secs(10), both_closed));
    assert_complete(&p);
}

#[test]
fn backoff_doubles_to_the_cap() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.refuse_connects = true;
    let w = p.client_wire().unwrap();
    p.cut(w, true, true);
    p.run_for(Duration::from_secs(10));
    let times: Vec<_> =
        p.client.events.iter().filter(|(_, e)| matches!(e, Event::Reconnect { .. })).map(|(t, _)| *t).collect();
    // Each refused connect takes 2 x latency; then the back-off.
    let gaps: Vec<u128> = times.windows(2).map(|w| (w[1] - w[0] - p.latency * 2).as_millis()).collect();
    assert_eq!(&gaps[..7], &[100, 200, 400, 800, 1600, 2000, 2000], "{gaps:?}");
    // Connect works again: the back-off resets after a resume.
    p.refuse_connects = false;
    assert!(p.run_until(Duration::from_secs(3), |p| p.client.has(|e| matches!(e, Event::Resumed { .. }))));
}

#[test]
fn resume_supersedes_a_transport_the_server_thinks_alive() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.run_for(Duration::from_secs(2));
    let old = p.server_wire().unwrap();
    // The client's network changes; its old path is gone, but the server has no idea.
    p.black_hole(old);
    let now = p.now;
    p.c().path_changed(now);
    assert!(p.run_until(Duration::from_millis(500), |p| p.server.has(|e| matches!(e, Event::Resumed { .. }))));
    assert!(p.server.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::Superseded, .. })));
    assert!(!p.server.has(|e| *e == Event::Suspended), "the server never lost the session");
    assert!(p.client.has(|e| matches!(e, Event::TransportClosed { reason: CloseReason::PathChanged, .. })));
    assert_ne!(p.server_wire(), Some(old));
    p.client.app_out = pattern(100_000, 9);
    p.server.app_out = pattern(100_000, 10);
    p.client.finish_after_send = true;
    p.server.finish_after_send = true;
    assert!(p.run_until(Duration::from_secs(5), both_closed));
    assert_complete(&p);
}

/// Client bytes on `wire` up to and including the first record after the preamble (msg1).
fn preamble_and_msg1(bytes: &[u8]) -> Vec<u8> {
    let len = usize::from(u16::from_be_bytes([bytes[wire::PREAMBLE_LEN], bytes[wire::PREAMBLE_LEN + 1]]));
    bytes[..wire::PREAMBLE_LEN + 2 + len].to_vec()
}

#[test]
fn replayed_resume_is_refused_and_the_live_session_keeps_working() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let w = p.client_wire().unwrap();
    p.cut(w, true, true);
    assert!(p.run_until(Duration::from_secs(2), |p| p.server.has(|e| matches!(e, Event::Resumed { .. }))));
    p.run_for(Duration::from_millis(300));
    let live = p.server_wire().unwrap();
    let recorded = p.wires[live].client_wrote.clone();
    let server_events_before = p.server.events.len();

    // Everything the client ever sent on that transport, replayed on a new connection...
    p.attacker_connect(&recorded);
    // ... and just its msg1, which gets an answer nobody can use.
    p.attacker_connect(&preamble_and_msg1(&recorded));
    p.run_for(Duration::from_secs(3));
    let new_events: Vec<_> = p.server.events[server_events_before..].iter().map(|(_, e)| e.clone()).collect();
    assert!(
        new_events.iter().any(|e| matches!(
            e,
            Event::TransportClosed { reason: CloseReason::Handshake(HandshakeError::AuthFailed), .. }
        )),
        "{new_events:?}"
    );
    assert!(
        new_events.iter().any(|e| matches!(
            e,
            Event::TransportClosed { reason: CloseReason::Handshake(HandshakeError::Timeout), .. }
        )),
        "{new_events:?}"
    );
    assert!(!new_events.iter().any(|e| matches!(e, Event::Resumed { .. } | Event::Suspended)), "{new_events:?}");
    assert_eq!(p.server_wire(), Some(live), "still on the real transport");

    // Bytes still flow on the original transport.
    p.client.app_out = pattern(50_000, 11);
    p.server.app_out = pattern(50_000, 12);
    p.client.finish_after_send = true;
    p.server.finish_after_send = true;
    assert!(p.run_until(Duration::from_secs(5), both_closed));
    assert_complete(&p);
}

#[test]
fn cut_before_the_server_saw_a_frame_still_resumes() {
    // msg2 reaches the client at 20 ms; its first frame would reach the server at 30 ms.
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(Duration::from_millis(25), |p| p.client.has(|e| matches!(e, Event::Established { .. }))));
    assert!(!p.server.has(|e| matches!(e, Event::Established { .. })), "not confirmed yet");
    assert_eq!(p.srv().state(), State::Connecting);
    p.cut(0, true, true);
    p.client.app_out = pattern(100_000, 14);
    p.server.app_out = pattern(100_000, 15);
    p.client.finish_after_send = true;
    p.server.finish_after_send = true;
    assert!(
        p.run_until(Duration::from_secs(5), both_closed),
        "client {:?}\nserver {:?}",
        p.client.events,
        p.server.events
    );
    assert_complete(&p);
    // The resume confirmed the session; only then did the server driver open the destination.
    assert_eq!(p.server.count(|e| matches!(e, Event::Established { .. })), 1);
    assert!(p.client.has(|e| *e == Event::Opened));
}

#[test]
fn replayed_open_never_reaches_the_destination() {
    let mut p = Pair::new(Config::default());
    p.connect();
    let recorded = p.wires[0].client_wrote.clone();
    p.attacker_connect(&recorded);
    p.attacker_connect(&preamble_and_msg1(&recorded));
    p.run_for(Config::default().confirm_timeout + Duration::from_secs(1));
    // Each replay got a session object, but none was ever confirmed, so the driver never
    // connected anywhere for them, and both are gone after `confirm_timeout`.
    assert_eq!(p.rogues.len(), 2);
    for (s, events) in &p.rogues {
        assert!(!events.iter().any(|e| matches!(e, Event::Established { .. })), "{events:?}");
        assert!(events.contains(&Event::Failed(SessionError::Handshake(HandshakeError::Timeout))), "{events:?}");
        assert_eq!(s.state(), State::Failed);
    }
    // The first one saw the replayed frames fail to decrypt.
    assert!(p.rogues[0].1.iter().any(|e| matches!(e, Event::TransportClosed { reason: CloseReason::Broken(_), .. })));
    assert_eq!(p.srv().state(), State::Established);
}

/// Runs a forged resume handshake against the server with `resume_secret_guess` and returns
/// the server's close reason for it.
fn forged_resume(p: &mut Pair, proof: [u8; 32]) -> CloseReason {
    let id = p.srv().id().unwrap();
    let mut hs = handshake::initiator(&Secret::from_bytes([42; 32]));
    let msg1 = handshake::write(&mut hs, &Hello::Resume { session_id: id, received: 0 }.encode()).unwrap();
    let mut bytes = BytesMut::new();
    bytes.extend_from_slice(&wire::preamble());
    super::super::accept::put_noise_record(&mut bytes, &msg1);
    let w = p.attacker_connect(&bytes);
    p.run_for(Duration::from_millis(50));
    // The server answered: read its msg2 like a real client would.
    let reply = p.wires[w].server_wrote.clone();
    let body = &reply[wire::PREAMBLE_LEN + 2..];
    assert_eq!(body[0], wire::REC_NOISE);
    let payload = handshake::read(&mut hs, &body[1..]).unwrap();
    assert!(matches!(Answer::decode(&payload).unwrap(), Answer::Resumed { .. }));
    let mut ts = hs.into_transport_mode().unwrap();
    let mut plain = Vec::new();
    Frame::ResumeConfirm { proof }.encode(&mut plain);
    let mut sealed = Vec::new();
    handshake::seal(&mut ts, &plain, &mut sealed).unwrap();
    let mut rec = BytesMut::new();
    wire::put_record(&mut rec, &sealed);
    let before = p.server.events.len();
    p.inject_to_server(w, &rec);
    p.run_for(Duration::from_millis(50));
    p.server.events[before..]
        .iter()
        .find_map(|(_, e)| match e {
            Event::TransportClosed { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .expect("the forged transport was closed")
}

#[test]
fn wrong_proof_is_refused_by_the_server() {
    // An agent holding the cluster secret but not this session's resume secret.
    let mut p = Pair::new(Config::default());
    p.connect();
    let live = p.server_wire().unwrap();
    assert_eq!(forged_resume(&mut p, [0; 32]), CloseReason::Handshake(HandshakeError::BadProof));
    assert_eq!(p.server_wire(), Some(live));
    assert_eq!(p.srv().state(), State::Established);
    p.client.app_out = b"still here".to_vec();
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.server.received, b"still here");
}

#[test]
fn wrong_proof_is_refused_by_the_client_and_retried() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.c().corrupt_resume_secret();
    let w = p.client_wire().unwrap();
    p.cut(w, true, true);
    p.run_for(Duration::from_secs(3));
    assert!(
        p.client.has(|e| matches!(
            e,
            Event::TransportClosed { reason: CloseReason::Handshake(HandshakeError::BadProof), .. }
        ))
    );
    // Not fatal: an impostor answering must not end the session; the client keeps trying.
    assert!(matches!(p.c().state(), State::Suspended | State::Resuming));
    assert!(p.client.count(|e| matches!(e, Event::Reconnect { .. })) >= 3);
    assert_eq!(p.srv().state(), State::Suspended);
}

#[test]
fn unknown_session_is_refused_and_ends_the_client_session() {
    let mut p = Pair::new(Config::default());
    p.connect();
    p.server.session = None; // the server agent restarted
    let w = p.client_wire().unwrap();
    p.cut(w, true, false);
    assert!(p.run_until(Duration::from_secs(2), |p| p.client.has(|e| matches!(e, Event::Failed(_)))));
    assert!(p.client.has(|e| *e == Event::Failed(SessionError::Handshake(HandshakeError::UnknownSession))));
}

#[test]
fn keep_for_expiry_on_both_sides() {
    let config = Config { keep_for: Duration::from_secs(20), ..Config::default() };
    let mut p = Pair::new(config);
    p.connect();
    p.client.app_out = pattern(10_000, 13);
    p.run_for(Duration::from_millis(5));
    let w = p.client_wire().unwrap();
    p.black_hole(w);
    p.net_down = true;
    assert!(p.run_until(Duration::from_secs(40), |p| p.client.has(|e| *e == Event::Expired)
        && p.server.has(|e| *e == Event::Expired)));
    for side in [&p.client, &p.server] {
        let suspended = side.events.iter().find(|(_, e)| *e == Event::Suspended).unwrap().0;
        let expired = side.events.iter().find(|(_, e)| *e == Event::Expired).unwrap().0;
        assert_eq!(expired - suspended, Duration::from_secs(20));
        assert_eq!(side.count(|e| e.is_terminal()), 1);
    }
    assert_eq!(p.c().state(), State::Failed);
    // Nothing more happens afterwards.
    assert_eq!(p.c().poll_timeout(), None);
    assert_eq!(p.c().send(b"x"), 0);
}

#[test]
fn garbage_after_handshake_kills_only_that_transport() {
    let mut p = streaming(small(), 4, 500_000, 500_000);
    p.run_for(Duration::from_millis(50));
    let w = p.client_wire().unwrap();
    // A well-framed record that does not decrypt, then a record with a bogus length.
    p.inject_to_server(
        w,
        &[
            0, 40, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27,
            28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40,
        ],
    );
    assert!(p.run_until(Duration::from_secs(60), both_closed));
    assert_complete(&p);
    assert_eq!(p.srv().stats().broken_transports, 1);
    assert!(p.server.has(|e| *e
        == Event::TransportClosed {
            transport: crate::session::TransportId(0),
            reason: CloseReason::Broken(crate::session::ProtocolError::Decrypt)
        }));
}

#[test]
fn bit_flips_in_either_direction_are_survived() {
    for (i, to_client) in [(0usize, true), (1, false), (2, true), (3, false)] {
        let mut p = streaming(small(), 10 + i as u64, 300_000, 300_000);
        p.run_for(Duration::from_millis(30 + 7 * i as u64));
        let w = p.client_wire().unwrap();
        let flipped =
            if to_client { p.flip_bit_to_client(w, 1000 * i + 3) } else { p.flip_bit_to_server(w, 1000 * i + 3) };
        assert!(flipped);
        assert!(p.run_until(Duration::from_secs(60), both_closed), "case {i}");
        assert_complete(&p);
        let broken = p.c().stats().broken_transports + p.srv().stats().broken_transports;
        assert_eq!(broken, 1, "case {i}");
    }
}

#[test]
fn old_transport_bytes_replayed_into_the_new_one() {
    let mut p = streaming(small(), 5, 400_000, 400_000);
    p.run_for(Duration::from_millis(40));
    let first = p.client_wire().unwrap();
    p.cut(first, true, true);
    assert!(p.run_until(Duration::from_secs(2), |p| p.server.has(|e| matches!(e, Event::Resumed { .. }))));
    let w = p.client_wire().unwrap();
    // Records from the old transport, spliced into the new one at a record boundary.
    let old = p.wires[first].client_wrote.clone();
    p.inject_to_server(w, &old[wire::PREAMBLE_LEN..]);
    assert!(p.run_until(Duration::from_secs(60), both_closed));
    assert_complete(&p);
    assert_eq!(p.srv().stats().broken_transports, 1);
}

#[test]
fn resume_races_the_fin() {
    // Cut at many points around the end of the streams: fin in flight, final ack in flight,
    // Close in flight.
    for step_ms in 0..40u64 {
        let mut p = streaming(Config::default(), 20 + step_ms, 20_000, 30_000);
        p.run_for(Duration::from_millis(step_ms));
        if let Some(w) = p.client_wire() {
            p.cut(w, step_ms % 2 == 0, step_ms % 3 == 0);
        }
        assert!(
            p.run_until(Duration::from_secs(30), both_closed),
            "step {step_ms}: client {:?}\nserver {:?}",
            p.client.events,
            p.server.events
        );
        assert_complete(&p);
    }
}
