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
    /// and reports with `Session::open_result`. The client has already proven (with its first
    /// frame) that it completed the handshake.
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
    /// The destination of an `Open`, until the session is created.
    dst: Option<SocketAddr>,
    outcome: Option<Result<Accepted, HandshakeError>>,
    done: bool,
}

enum Step {
    Preamble(Box<HandshakeState>),
    Msg1(Box<HandshakeState>),
    /// msg2 of an `Open` was sent. The session is created only when the client's first
    /// frame decrypts: a replayed msg1 thus never makes us connect to the destination, and
    /// no session exists that the client does not know about.
    FirstFrame { ts: Box<snow::TransportState>, id: SessionId, resume_secret: Key },
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
            dst: None,
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
                Step::FirstFrame { mut ts, id, resume_secret } => {
                    let Some(record) = self.reader.next_record() else {
                        self.step = Step::FirstFrame { ts, id, resume_secret };
                        return Ok(());
                    };
                    // Only the holder of the initiator's ephemeral key can produce this.
                    let first = handshake::open(&mut ts, &record).map_err(|_| HandshakeError::AuthFailed)?;
                    let dst = self.dst.take().ok_or(HandshakeError::TransportClosed)?;
                    let session =
                        Session::accept_new(self.now, self.config.clone(), id, resume_secret, *ts, first, self.reader.take_rest());
                    self.finish(Ok(Accepted::New { session, dst }));
                    return Ok(());
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
                let id = SessionId(handshake::random());
                let seed: Key = handshake::random();
                // Writing a tiny msg2 and splitting cannot fail with a working snow build;
                // treat a failure like any failed handshake rather than panic.
                let msg2 = handshake::write(&mut hs, &Answer::Opened { session_id: id, resume_seed: seed }.encode())
                    .map_err(|_| HandshakeError::AuthFailed)?;
                let resume_secret = handshake::resume_secret(&handshake::handshake_hash(&hs), &seed);
                let ts = hs.into_transport_mode().map_err(|_| HandshakeError::AuthFailed)?;
                self.out.put_slice(&wire::preamble());
                put_noise_record(&mut self.out, &msg2);
                self.dst = Some(dst);
                self.step = Step::FirstFrame { ts: Box::new(ts), id, resume_secret };
                Ok(None)
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
