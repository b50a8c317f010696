//! Typed errors of the session protocol.

use std::fmt;

/// A handshake (initial or resume) did not complete. Each variant says what an operator should
/// look at; `Display` is written for logs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake timed out")]
    Timeout,
    #[error("the peer is not a rocks agent (unexpected bytes instead of the rocks preamble)")]
    NotARocksPeer,
    #[error("protocol version mismatch: ours is {ours}, the peer speaks {theirs}")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("handshake authentication failed: the peer does not hold our cluster secret")]
    AuthFailed,
    #[error("the peer does not know this session (it expired, was closed, or the agent restarted)")]
    UnknownSession,
    #[error("resume proof did not verify")]
    BadProof,
    #[error("peer rejected the handshake: {0}")]
    PeerRejected(RejectReason),
    #[error("malformed handshake message: {0}")]
    Malformed(WireError),
    #[error("transport closed during the handshake")]
    TransportClosed,
}

/// Why a responder rejected a handshake. Sent as a plaintext `Reject` (unauthenticated: it can
/// only end the attempt, exactly like an EOF) or inside the authenticated msg2 (`Refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// msg1 did not decrypt: the two agents hold different cluster secrets.
    AuthFailed,
    /// The preambles carry different protocol versions.
    VersionMismatch,
    /// The first message was not a well-formed rocks handshake message.
    Malformed,
    /// (authenticated) The responder has no session with that id.
    UnknownSession,
    /// A code this version does not know.
    Other(u8),
}

impl RejectReason {
    pub(crate) fn code(self) -> u8 {
        match self {
            RejectReason::AuthFailed => 1,
            RejectReason::VersionMismatch => 2,
            RejectReason::Malformed => 3,
            RejectReason::UnknownSession => 4,
            RejectReason::Other(c) => c,
        }
    }

    pub(crate) fn from_code(c: u8) -> RejectReason {
        match c {
            1 => RejectReason::AuthFailed,
            2 => RejectReason::VersionMismatch,
            3 => RejectReason::Malformed,
            4 => RejectReason::UnknownSession,
            c => RejectReason::Other(c),
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::AuthFailed => f.write_str("wrong cluster secret"),
            RejectReason::VersionMismatch => f.write_str("protocol version mismatch"),
            RejectReason::Malformed => f.write_str("malformed handshake"),
            RejectReason::UnknownSession => f.write_str("unknown session"),
            RejectReason::Other(c) => write!(f, "reason code {c}"),
        }
    }
}

/// The server agent could not connect to the destination. Carried in `OpenResult` as a code
/// so the client can tell the app something close to what a direct connect would have said.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("connection refused by the destination")]
    Refused,
    #[error("destination unreachable")]
    Unreachable,
    #[error("connecting to the destination timed out")]
    TimedOut,
    #[error("destination not allowed (not an address of the peer's host)")]
    NotAllowed,
    #[error("connect failed (code {0})")]
    Other(u32),
}

impl OpenError {
    pub(crate) fn code(self) -> u32 {
        match self {
            OpenError::Refused => 1,
            OpenError::Unreachable => 2,
            OpenError::TimedOut => 3,
            OpenError::NotAllowed => 4,
            OpenError::Other(c) => c,
        }
    }

    /// `code` is never 0 here (0 means success on the wire).
    pub(crate) fn from_code(c: u32) -> OpenError {
        match c {
            1 => OpenError::Refused,
            2 => OpenError::Unreachable,
            3 => OpenError::TimedOut,
            4 => OpenError::NotAllowed,
            c => OpenError::Other(c),
        }
    }
}

/// Bytes that do not parse as what the protocol expects at that point. Never a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("{0} has {1} trailing bytes")]
    Trailing(&'static str, usize),
    #[error("unknown frame type {0:#04x}")]
    UnknownFrame(u8),
    #[error("unknown handshake message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("unknown address family {0}")]
    BadFamily(u8),
    #[error("empty record")]
    Empty,
    #[error("unexpected {0}")]
    Unexpected(&'static str),
}

/// An authenticated peer broke the protocol (or the transport delivered something impossible).
/// The transport carrying it is treated as broken; the session itself survives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame failed to decrypt")]
    Decrypt,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("data at offset {offset} leaves a gap (next expected {expected})")]
    Gap { offset: u64, expected: u64 },
    #[error("data offset overflow")]
    Overflow,
    #[error("data past the peer's fin at {fin}")]
    DataAfterFin { fin: u64 },
    #[error("fin at {offset} does not match the received stream end {received}")]
    BadFin { offset: u64, received: u64 },
    #[error("ack {ack} beyond what we sent ({sent})")]
    AckBeyondSent { ack: u64, sent: u64 },
    #[error("peer buffered more than {limit} undelivered bytes")]
    ReceiveQueueFull { limit: usize },
    #[error("unexpected {0} frame")]
    Unexpected(&'static str),
}

/// Why a session ended unsuccessfully (`Event::Failed`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("handshake failed: {0}")]
    Handshake(#[from] HandshakeError),
    #[error("peer reported a resume position we cannot serve: {0}")]
    ResumeMismatch(String),
}
