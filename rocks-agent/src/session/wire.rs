//! The byte formats: preamble, length-prefixed records, handshake payloads and frames.
//! Parsing is strict (exact lengths, no trailing bytes) and never panics on any input; the
//! format is specified in `docs/protocol.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};

use super::{SessionId, error::WireError};

/// First bytes a client writes on every transport. The leading non-ASCII byte (as in PNG's
/// signature) keeps text protocols from ever matching it by accident.
pub(crate) const MAGIC: [u8; 6] = *b"\x89RCKS\n";
/// The protocol version this code speaks.
pub(crate) const VERSION: u16 = 1;
pub(crate) const PREAMBLE_LEN: usize = MAGIC.len() + 2;

/// Largest record body: the length prefix is a u16, which is also Noise's message limit.
pub(crate) const MAX_RECORD: usize = 65535;
/// Noise's AEAD tag, appended to every encrypted message.
pub(crate) const TAG_LEN: usize = 16;
/// Largest plaintext frame that fits one encrypted record.
pub(crate) const MAX_FRAME: usize = MAX_RECORD - TAG_LEN;
/// Frame type byte + offset.
pub(crate) const DATA_HEADER: usize = 1 + 8;
/// Largest data payload of one `Data` frame.
pub(crate) const MAX_DATA_PAYLOAD: usize = MAX_FRAME - DATA_HEADER;

pub(crate) fn preamble() -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..MAGIC.len()].copy_from_slice(&MAGIC);
    p[MAGIC.len()..].copy_from_slice(&VERSION.to_be_bytes());
    p
}

/// Checks a peer's preamble. Returns the peer's version on a magic match.
pub(crate) enum PreambleCheck {
    Ok,
    NotRocks,
    Version(u16),
}

/// True when `partial` (fewer bytes than a preamble) can no longer become a rocks preamble,
/// so a non-rocks peer is reported at once instead of after a timeout.
pub(crate) fn preamble_impossible(partial: &[u8]) -> bool {
    let n = partial.len().min(MAGIC.len());
    partial[..n] != MAGIC[..n]
}

pub(crate) fn check_preamble(p: &[u8]) -> PreambleCheck {
    if p.len() < PREAMBLE_LEN || p[..MAGIC.len()] != MAGIC {
        return PreambleCheck::NotRocks;
    }
    match u16::from_be_bytes([p[MAGIC.len()], p[MAGIC.len() + 1]]) {
        VERSION => PreambleCheck::Ok,
        v => PreambleCheck::Version(v),
    }
}

/// Appends one record (u16 big-endian length, then the body) to `out`.
pub(crate) fn put_record(out: &mut BytesMut, body: &[u8]) {
    debug_assert!(body.len() <= MAX_RECORD);
    out.put_u16(body.len() as u16);
    out.put_slice(body);
}

/// Reassembles records from transport bytes arriving in arbitrary chunks.
#[derive(Debug, Default)]
pub(crate) struct RecordReader {
    buf: BytesMut,
}

impl RecordReader {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Takes exactly `n` raw bytes (the preamble) if that many have arrived.
    pub(crate) fn take_raw(&mut self, n: usize) -> Option<Bytes> {
        (self.buf.len() >= n).then(|| self.buf.split_to(n).freeze())
    }

    /// The next complete record body, if one has fully arrived.
    pub(crate) fn next_record(&mut self) -> Option<Bytes> {
        if self.buf.len() < 2 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if self.buf.len() < 2 + len {
            return None;
        }
        self.buf.advance(2);
        Some(self.buf.split_to(len).freeze())
    }

    /// Bytes received but not consumed yet.
    pub(crate) fn peek(&self) -> &[u8] {
        &self.buf
    }

    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Everything not consumed yet (handed to the next owner of the transport).
    pub(crate) fn take_rest(&mut self) -> BytesMut {
        std::mem::take(&mut self.buf)
    }
}

/// Handshake-phase record kinds (the first body byte before the transport is encrypted).
pub(crate) const REC_NOISE: u8 = 1;
pub(crate) const REC_REJECT: u8 = 2;

/// msg1 payload: what the initiator wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A new session: "connect to `dst` on your host".
    Open { dst: SocketAddr },
    /// Resume an existing session; `received` is the initiator's receive position (the
    /// offset of the next byte it needs, plus one if it has the fin).
    Resume { session_id: SessionId, received: u64 },
}

/// msg2 payload: the responder's answer (authenticated: only a holder of the cluster secret
/// who also holds the initiator's ephemeral-derived keys can produce it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Opened { session_id: SessionId, resume_seed: [u8; 32] },
    Resumed { received: u64, proof: [u8; 32] },
    Refused { reason: u8 },
}

const HELLO_OPEN: u8 = 1;
const HELLO_RESUME: u8 = 2;
const ANSWER_OPENED: u8 = 1;
const ANSWER_RESUMED: u8 = 2;
const ANSWER_REFUSED: u8 = 3;

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Hello::Open { dst } => {
                out.push(HELLO_OPEN);
                put_addr(&mut out, dst);
            }
            Hello::Resume { session_id, received } => {
                out.push(HELLO_RESUME);
                out.extend_from_slice(&session_id.0);
                out.extend_from_slice(&received.to_be_bytes());
            }
        }
        out
    }

    pub(crate) fn decode(mut b: &[u8]) -> Result<Hello, WireError> {
        let hello = match take_u8(&mut b, "hello")? {
            HELLO_OPEN => Hello::Open { dst: take_addr(&mut b)? },
            HELLO_RESUME => Hello::Resume {
                session_id: SessionId(take_array(&mut b, "resume hello")?),
                received: take_u64(&mut b, "resume hello")?,
            },
            t => return Err(WireError::UnknownMessage(t)),
        };
        expect_end(b, "hello")?;
        Ok(hello)
    }
}

impl Answer {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Answer::Opened { session_id, resume_seed } => {
                out.push(ANSWER_OPENED);
                out.extend_from_slice(&session_id.0);
                out.extend_from_slice(resume_seed);
            }
            Answer::Resumed { received, proof } => {
                out.push(ANSWER_RESUMED);
                out.extend_from_slice(&received.to_be_bytes());
                out.extend_from_slice(proof);
            }
            Answer::Refused { reason } => {
                out.push(ANSWER_REFUSED);
                out.push(*reason);
            }
        }
        out
    }

    pub(crate) fn decode(mut b: &[u8]) -> Result<Answer, WireError> {
        let answer = match take_u8(&mut b, "answer")? {
            ANSWER_OPENED => Answer::Opened {
                session_id: SessionId(take_array(&mut b, "opened answer")?),
                resume_seed: take_array(&mut b, "opened answer")?,
            },
            ANSWER_RESUMED => Answer::Resumed {
                received: take_u64(&mut b, "resumed answer")?,
                proof: take_array(&mut b, "resumed answer")?,
            },
            ANSWER_REFUSED => Answer::Refused { reason: take_u8(&mut b, "refused answer")? },
            t => return Err(WireError::UnknownMessage(t)),
        };
        expect_end(b, "answer")?;
        Ok(answer)
    }
}

/// A frame on an established transport (the plaintext inside one encrypted record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// Stream bytes starting at stream position `offset`.
    Data { offset: u64, data: Bytes },
    /// Cumulative: the peer has taken every byte below `offset` (plus one for the fin).
    Ack { offset: u64 },
    /// Heartbeat; carries the sender's current ack.
    Ping { ack: u64 },
    /// Answer to a ping; carries the sender's current ack.
    Pong { ack: u64 },
    /// Half-close: the sender's stream ends at `offset`.
    Fin { offset: u64 },
    /// Abortive close by the application.
    Reset { code: u32 },
    /// Server to client: the outcome of connecting to the destination (0 = connected).
    OpenResult { code: u32 },
    /// First frame of the initiator on a resumed transport.
    ResumeConfirm { proof: [u8; 32] },
    /// Server to client: the server closed the session (both directions finished and
    /// acknowledged on its side). The client, the only side able to reconnect, keeps the
    /// session until it gets this, so the server never waits for an ack that got lost.
    Close,
}

const F_DATA: u8 = 1;
const F_ACK: u8 = 2;
const F_PING: u8 = 3;
const F_PONG: u8 = 4;
const F_FIN: u8 = 5;
const F_RESET: u8 = 6;
const F_OPEN_RESULT: u8 = 7;
const F_RESUME_CONFIRM: u8 = 8;
const F_CLOSE: u8 = 9;

impl Frame {
    /// The plaintext size of a data frame, and enough for every other frame: sized up front
    /// so encoding a large data frame never reallocates.
    pub(crate) fn encoded_len_hint(&self) -> usize {
        match self {
            Frame::Data { data, .. } => DATA_HEADER + data.len(),
            _ => 1 + 32,
        }
    }

    /// Appends the plaintext encoding to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data { offset, data } => {
                out.push(F_DATA);
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Frame::Ack { offset } => put_u64_frame(out, F_ACK, *offset),
            Frame::Ping { ack } => put_u64_frame(out, F_PING, *ack),
            Frame::Pong { ack } => put_u64_frame(out, F_PONG, *ack),
            Frame::Fin { offset } => put_u64_frame(out, F_FIN, *offset),
            Frame::Reset { code } => {
                out.push(F_RESET);
                out.extend_from_slice(&code.to_be_bytes());
            }
            Frame::OpenResult { code } => {
                out.push(F_OPEN_RESULT);
                out.extend_from_slice(&code.to_be_bytes());
            }
            Frame::ResumeConfirm { proof } => {
                out.push(F_RESUME_CONFIRM);
                out.extend_from_slice(proof);
            }
            Frame::Close => out.push(F_CLOSE),
        }
    }

    /// Parses one frame. `Data` borrows from `b` without copying.
    pub(crate) fn decode(b: Bytes) -> Result<Frame, WireError> {
        let Some((&ty, mut rest)) = b.split_first() else {
            return Err(WireError::Empty);
        };
        let frame = match ty {
            F_DATA => {
                let offset = take_u64(&mut rest, "data frame")?;
                return Ok(Frame::Data { offset, data: b.slice(DATA_HEADER..) });
            }
            F_ACK => Frame::Ack { offset: take_u64(&mut rest, "ack frame")? },
            F_PING => Frame::Ping { ack: take_u64(&mut rest, "ping frame")? },
            F_PONG => Frame::Pong { ack: take_u64(&mut rest, "pong frame")? },
            F_FIN => Frame::Fin { offset: take_u64(&mut rest, "fin frame")? },
            F_RESET => Frame::Reset { code: take_u32(&mut rest, "reset frame")? },
            F_OPEN_RESULT => Frame::OpenResult { code: take_u32(&mut rest, "open-result frame")? },
            F_RESUME_CONFIRM => Frame::ResumeConfirm { proof: take_array(&mut rest, "resume-confirm frame")? },
            F_CLOSE => Frame::Close,
            t => return Err(WireError::UnknownFrame(t)),
        };
        expect_end(rest, "frame")?;
        Ok(frame)
    }

    /// Name for logs and errors.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Frame::Data { .. } => "data",
            Frame::Ack { .. } => "ack",
            Frame::Ping { .. } => "ping",
            Frame::Pong { .. } => "pong",
            Frame::Fin { .. } => "fin",
            Frame::Reset { .. } => "reset",
            Frame::OpenResult { .. } => "open-result",
            Frame::ResumeConfirm { .. } => "resume-confirm",
            Frame::Close => "close",
        }
    }
}

fn put_u64_frame(out: &mut Vec<u8>, ty: u8, v: u64) {
    out.push(ty);
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn take_addr(b: &mut &[u8]) -> Result<SocketAddr, WireError> {
    let ip = match take_u8(b, "address")? {
        4 => IpAddr::V4(Ipv4Addr::from(take_array::<4>(b, "address")?)),
        6 => IpAddr::V6(Ipv6Addr::from(take_array::<16>(b, "address")?)),
        f => return Err(WireError::BadFamily(f)),
    };
    let port = u16::from_be_bytes(take_array(b, "address")?);
    Ok(SocketAddr::new(ip, port))
}

fn take_array<const N: usize>(b: &mut &[u8], what: &'static str) -> Result<[u8; N], WireError> {
    let (head, rest) = b.split_first_chunk::<N>().ok_or(WireError::Truncated(what))?;
    *b = rest;
    Ok(*head)
}

fn take_u8(b: &mut &[u8], what: &'static str) -> Result<u8, WireError> {
    Ok(take_array::<1>(b, what)?[0])
}

fn take_u32(b: &mut &[u8], what: &'static str) -> Result<u32, WireError> {
    Ok(u32::from_be_bytes(take_array(b, what)?))
}

fn take_u64(b: &mut &[u8], what: &'static str) -> Result<u64, WireError> {
    Ok(u64::from_be_bytes(take_array(b, what)?))
}

fn expect_end(b: &[u8], what: &'static str) -> Result<(), WireError> {
    if b.is_empty() { Ok(()) } else { Err(WireError::Trailing(what, b.len())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Data { offset: 0, data: Bytes::new() },
            Frame::Data { offset: u64::MAX - 3, data: Bytes::from_static(b"abc") },
            Frame::Data { offset: 7, data: Bytes::from(vec![0x5a; MAX_DATA_PAYLOAD]) },
            Frame::Ack { offset: 1 << 40 },
            Frame::Ping { ack: 0 },
            Frame::Pong { ack: u64::MAX },
            Frame::Fin { offset: 12345 },
            Frame::Reset { code: 0xdead_beef },
            Frame::OpenResult { code: 0 },
            Frame::OpenResult { code: 2 },
            Frame::ResumeConfirm { proof: [7; 32] },
            Frame::Close,
        ]
    }

    #[test]
    fn frames_round_trip() {
        for frame in all_frames() {
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            assert!(buf.len() <= MAX_FRAME, "{} too long", frame.name());
            assert_eq!(Frame::decode(Bytes::from(buf)).unwrap(), frame);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for frame in all_frames() {
            if matches!(frame, Frame::Data { .. }) {
                continue; // any data length is valid once the header is complete
            }
            let mut buf = Vec::new();
            frame.encode(&mut buf);
            for cut in 0..buf.len() {
                let r = Frame::decode(Bytes::copy_from_slice(&buf[..cut]));
                assert!(r.is_err(), "{} cut at {cut} parsed: {r:?}", frame.name());
            }
            // And a trailing byte is refused too.
            buf.push(0);
            assert!(matches!(Frame::decode(Bytes::from(buf)), Err(WireError::Trailing(..))));
        }
        // A data frame needs its whole header.
        for cut in 0..DATA_HEADER {
            let mut buf = Vec::new();
            Frame::Data { offset: 9, data: Bytes::from_static(b"xy") }.encode(&mut buf);
            assert!(Frame::decode(Bytes::copy_from_slice(&buf[..cut])).is_err());
        }
    }

    #[test]
    fn unknown_types_are_errors() {
        for ty in [0u8, 10, 0x7f, 0xff] {
            assert_eq!(Frame::decode(Bytes::from(vec![ty, 0, 0, 0, 0, 0, 0, 0, 0])), Err(WireError::UnknownFrame(ty)));
            assert_eq!(Hello::decode(&[ty]), Err(WireError::UnknownMessage(ty)));
        }
        assert_eq!(Frame::decode(Bytes::new()), Err(WireError::Empty));
    }

    #[test]
    fn handshake_payloads_round_trip_and_truncate() {
        let hellos = [
            Hello::Open { dst: "10.1.2.3:443".parse().unwrap() },
            Hello::Open { dst: "[2001:db8::1]:22".parse().unwrap() },
            Hello::Resume { session_id: SessionId([3; 16]), received: 99 },
        ];
        for h in hellos {
            let buf = h.encode();
            assert_eq!(Hello::decode(&buf).unwrap(), h);
            for cut in 0..buf.len() {
                assert!(Hello::decode(&buf[..cut]).is_err());
            }
            let mut long = buf.clone();
            long.push(1);
            assert!(Hello::decode(&long).is_err());
        }
        let answers = [
            Answer::Opened { session_id: SessionId([1; 16]), resume_seed: [2; 32] },
            Answer::Resumed { received: 5, proof: [9; 32] },
            Answer::Refused { reason: 4 },
        ];
        for a in answers {
            let buf = a.encode();
            assert_eq!(Answer::decode(&buf).unwrap(), a);
            for cut in 0..buf.len() {
                assert!(Answer::decode(&buf[..cut]).is_err());
            }
        }
        assert_eq!(Hello::decode(&[HELLO_OPEN, 5, 0, 0]), Err(WireError::BadFamily(5)));
    }

    #[test]
    fn records_reassemble_from_any_chunking() {
        let mut stream = BytesMut::new();
        let bodies: Vec<Vec<u8>> = vec![vec![], vec![1], vec![2; 300], vec![3; MAX_RECORD]];
        for b in &bodies {
            put_record(&mut stream, b);
        }
        for chunk in [1usize, 2, 3, 7, 1000, stream.len()] {
            let mut reader = RecordReader::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                reader.push(piece);
                while let Some(r) = reader.next_record() {
                    got.push(r.to_vec());
                }
            }
            assert_eq!(got, bodies, "chunk size {chunk}");
            assert_eq!(reader.buffered(), 0);
        }
    }

    #[test]
    fn preamble_checks() {
        assert!(matches!(check_preamble(&preamble()), PreambleCheck::Ok));
        assert!(matches!(check_preamble(b"HTTP/1.1"), PreambleCheck::NotRocks));
        assert!(matches!(check_preamble(b"\x89RC"), PreambleCheck::NotRocks));
        let mut p = preamble();
        p[7] = 9;
        assert!(matches!(check_preamble(&p), PreambleCheck::Version(9)));
    }
}
