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
    /// A new session (msg2 comes out of the `Accept`'s `poll_transmit`). Keep it in the
    /// session table at once (a resume may arrive for it), and connect to `dst` (after
    /// checking it belongs to this host) when the session reports `Event::Established`, which
    /// needs the client's first frame; then call `Session::open_result`.
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
    step: Step,
    reader: wire::RecordReader,
    deadline: Instant,
    now: Instant,
    out: BytesMut,
    outcome: Option<Result<Accepted, HandshakeError>>,
    done: bool,
}

enum Step {
    Preamble(Box<HandshakeState>),
    Msg1(Box<HandshakeState>),
    Done,
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
            step: Step::Preamble(Box::new(handshake::responder(secret))),
            reader: wire::RecordReader::default(),
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

    /// Bytes to write to the transport: the server preamble and msg2 of a new session, or a
    /// rejection (then close the transport).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// What the transport is for, once known. Write out `poll_transmit` first in every case;
    /// after an `Err` close the transport; after `Ok` the `Accept` has no further use.
    pub fn poll_outcome(&mut self) -> Option<Result<Accepted, HandshakeError>> {
        self.outcome.take()
    }

    fn finish(&mut self, outcome: Result<Accepted, HandshakeError>) {
        self.done = true;
        self.outcome = Some(outcome);
    }

    fn process(&mut self) -> Result<(), HandshakeError> {
        loop {
            match std::mem::replace(&mut self.step, Step::Done) {
                Step::Preamble(hs) => {
                    if wire::preamble_impossible(self.reader.peek()) {
                        return Err(HandshakeError::NotARocksPeer);
                    }
                    let Some(p) = self.reader.take_raw(wire::PREAMBLE_LEN) else {
                        self.step = Step::Preamble(hs);
                        return Ok(());
                    };
                    match wire::check_preamble(&p) {
                        PreambleCheck::Ok => self.step = Step::Msg1(hs),
                        PreambleCheck::NotRocks => return Err(HandshakeError::NotARocksPeer),
                        PreambleCheck::Version(theirs) => {
                            // Our preamble tells the client which version we speak.
                            self.out = plaintext_reject(RejectReason::VersionMismatch);
                            return Err(HandshakeError::VersionMismatch { ours: wire::VERSION, theirs });
                        }
                    }
                }
                Step::Msg1(hs) => {
                    let Some(record) = self.reader.next_record() else {
                        self.step = Step::Msg1(hs);
                        return Ok(());
                    };
                    if let Some(accepted) = self.msg1(*hs, &record)? {
                        self.finish(Ok(accepted));
                        return Ok(());
                    }
                }
                Step::Done => return Ok(()),
            }
        }
    }

    /// Handles msg1. Returns the outcome for a resume; for an open, queues msg2 and moves on
    /// to waiting for the client's first frame.
    fn msg1(&mut self, mut hs: HandshakeState, record: &[u8]) -> Result<Option<Accepted>, HandshakeError> {
        let Some((&wire::REC_NOISE, msg1)) = record.split_first() else {
            self.out = plaintext_reject(RejectReason::Malformed);
            return Err(HandshakeError::NotARocksPeer);
        };
        let Ok(payload) = handshake::read(&mut hs, msg1) else {
            // With psk0 a wrong cluster secret fails right here. Say so in plaintext: it only
            // ends this attempt, which the client would conclude from an EOF too.
            self.out = plaintext_reject(RejectReason::AuthFailed);
            return Err(HandshakeError::AuthFailed);
        };
        let hello = Hello::decode(&payload).map_err(|e| {
            self.out = plaintext_reject(RejectReason::Malformed);
            HandshakeError::Malformed(e)
        })?;
        match hello {
            Hello::Open { dst } => {
                let rest = self.reader.take_rest();
                let session = Session::accept_new(self.now, self.config.clone(), hs, rest, &mut self.out)?;
                Ok(Some(Accepted::New { session, dst }))
            }
            Hello::Resume { session_id, received } => Ok(Some(Accepted::Resume {
                session_id,
                attempt: ResumeAttempt {
                    hash_after_msg1: handshake::handshake_hash(&hs),
                    hs,
                    session_id,
                    peer_received: received,
                    rest: self.reader.take_rest(),
                },
            })),
        }
    }
}
