//! Server side of a fresh inbound transport: reads the preamble and the Noise msg1, and says
//! what the transport is for (a new session or a resume), or why it is refused. Nothing here
//! touches an existing session: a forged or replayed msg1 can at worst produce a
//! `ResumeAttempt`, which the session verifies before it trusts anything in it.

use std::{net::SocketAddr, time::Instant};

use bytes::{BufMut as _, Bytes, BytesMut};
use snow::HandshakeState;
use tracing::debug;

use super::{
    Config, SessionId,
    error::{HandshakeError, RejectReason},
    handshake::{self, Key},
    machine::Session,
    wire::{self, Answer, Hello, PreambleCheck},
};
use crate::secret::Secret;

/// What a new inbound transport turned out to be.
#[derive(Debug)]
pub enum Accepted {
    /// A new session. The driver connects to `dst` (after checking it belongs to this host)
    /// and reports with `Session::open_result`. msg2 is already queued in the session.
    New { session: Session, dst: SocketAddr },
    /// A resume of `session_id`: hand `attempt` to that session's `accept_resume`, or send
    /// `attempt.refuse()` when no such session exists.
    Resume { session_id: SessionId, attempt: ResumeAttempt },
}

/// A resume request whose msg1 decrypted under the cluster secret. Not yet trusted: the
/// session checks the proof of the resume secret before switching to it.
pub struct ResumeAttempt {
    pub(crate) hs: HandshakeState,
    pub(crate) session_id: SessionId,
    /// The initiator's receive position (see `wire::Hello::Resume`).
    pub(crate) peer_received: u64,
    /// Handshake hash after msg1: the responder's proof covers it.
    pub(crate) hash_after_msg1: Key,
    /// Bytes that arrived after msg1 (normally none: the client waits for msg2).
    pub(crate) rest: BytesMut,
}

impl std::fmt::Debug for ResumeAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeAttempt").field("session_id", &self.session_id).finish_non_exhaustive()
    }
}

impl ResumeAttempt {
    pub fn session_id(&self) -> SessionId {
        self.session_id
    }

    /// The bytes to write before closing the transport when the session is unknown: an
    /// authenticated refusal (inside msg2), so the client can give up at once instead of
    /// retrying for `keep_for`.
    pub fn refuse(self) -> Bytes {
        refusal(self.hs, RejectReason::UnknownSession)
    }
}

/// Preamble plus an authenticated `Refused` msg2.
pub(crate) fn refusal(mut hs: HandshakeState, reason: RejectReason) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(&wire::preamble());
    if let Ok(msg2) = handshake::write(&mut hs, &Answer::Refused { reason: reason.code() }.encode()) {
        put_noise_record(&mut out, &msg2);
    }
    out.freeze()
}

pub(crate) fn put_noise_record(out: &mut BytesMut, msg: &[u8]) {
    let mut body = Vec::with_capacity(1 + msg.len());
    body.push(wire::REC_NOISE);
    body.extend_from_slice(msg);
    wire::put_record(out, &body);
}

/// Preamble plus a plaintext `Reject`.
fn plaintext_reject(reason: RejectReason) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_slice(&wire::preamble());
    wire::put_record(&mut out, &[wire::REC_REJECT, reason.code()]);
    out
}

/// A fresh inbound transport on the server, before it is known what it is for.
pub struct Accept {
    config: Config,
    hs: Option<HandshakeState>,
    reader: wire::RecordReader,
    got_preamble: bool,
    deadline: Instant,
    now: Instant,
    out: BytesMut,
    outcome: Option<Result<Accepted, HandshakeError>>,
    done: bool,
}

impl std::fmt::Debug for Accept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accept").field("done", &self.done).finish_non_exhaustive()
    }
}

impl Accept {
    pub fn new(now: Instant, config: Config, secret: &Secret) -> Accept {
        let config = config.sanitized();
        Accept {
            deadline: now + config.handshake_timeout,
            config,
            hs: Some(handshake::responder(secret)),
            reader: wire::RecordReader::default(),
            got_preamble: false,
            now,
            out: BytesMut::new(),
            outcome: None,
            done: false,
        }
    }

    /// Raw bytes read from the transport, in any chunking.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        self.now = now;
        if self.done {
            return;
        }
        self.reader.push(bytes);
        if let Err(e) = self.process() {
            debug!(error = %e, "inbound transport refused");
            self.finish(Err(e));
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if !self.done && now >= self.deadline {
            self.finish(Err(HandshakeError::Timeout));
        }
    }

    /// The driver reports EOF or an error before the outcome.
    pub fn transport_lost(&mut self) {
        if !self.done {
            self.finish(Err(HandshakeError::TransportClosed));
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.done).then_some(self.deadline)
    }

    /// Bytes to write to the transport: only ever a rejection, written before closing it.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// What the transport is for, once known. After an `Err`, write out `poll_transmit` and
    /// close the transport; after `Ok`, the `Accept` has no further use.
    pub fn poll_outcome(&mut self) -> Option<Result<Accepted, HandshakeError>> {
        self.outcome.take()
    }

    fn finish(&mut self, outcome: Result<Accepted, HandshakeError>) {
        self.done = true;
        self.outcome = Some(outcome);
    }

    fn process(&mut self) -> Result<(), HandshakeError> {
        if !self.got_preamble {
            if wire::preamble_impossible(self.reader.peek()) {
                return Err(HandshakeError::NotARocksPeer);
            }
            let Some(p) = self.reader.take_raw(wire::PREAMBLE_LEN) else { return Ok(()) };
            match wire::check_preamble(&p) {
                PreambleCheck::Ok => self.got_preamble = true,
                PreambleCheck::NotRocks => return Err(HandshakeError::NotARocksPeer),
                PreambleCheck::Version(theirs) => {
                    // Our preamble tells the client which version we speak.
                    self.out = plaintext_reject(RejectReason::VersionMismatch);
                    return Err(HandshakeError::VersionMismatch { ours: wire::VERSION, theirs });
                }
            }
        }
        let Some(record) = self.reader.next_record() else { return Ok(()) };
        let Some((&wire::REC_NOISE, msg1)) = record.split_first() else {
            self.out = plaintext_reject(RejectReason::Malformed);
            return Err(HandshakeError::NotARocksPeer);
        };
        let mut hs = self.hs.take().ok_or(HandshakeError::TransportClosed)?;
        let payload = match handshake::read(&mut hs, msg1) {
            Ok(p) => p,
            Err(_) => {
                // With psk0 a wrong cluster secret fails right here. Say so in plaintext:
                // it only ends this attempt, which the client would conclude from EOF too.
                self.out = plaintext_reject(RejectReason::AuthFailed);
                return Err(HandshakeError::AuthFailed);
            }
        };
        let hello = match Hello::decode(&payload) {
            Ok(h) => h,
            Err(e) => {
                self.out = plaintext_reject(RejectReason::Malformed);
                return Err(HandshakeError::Malformed(e));
            }
        };
        let accepted = match hello {
            Hello::Open { dst } => {
                let session = Session::accept_new(self.now, self.config.clone(), hs, self.reader.take_rest())?;
                Accepted::New { session, dst }
            }
            Hello::Resume { session_id, received } => Accepted::Resume {
                session_id,
                attempt: ResumeAttempt {
                    hash_after_msg1: handshake::handshake_hash(&hs),
                    hs,
                    session_id,
                    peer_received: received,
                    rest: self.reader.take_rest(),
                },
            },
        };
        self.finish(Ok(accepted));
        Ok(())
    }
}
