//! The two byte streams of a session: the bounded replay buffer of what we send, and the
//! in-order receive queue of what the peer sends. Offsets are stream positions (u64, per
//! direction); the fin counts as one position past the last byte, like TCP's FIN.

use std::collections::VecDeque;

use bytes::Bytes;

use super::error::ProtocolError;

/// Sent-but-unacknowledged bytes, kept for retransmission on a new transport.
///
/// Invariant: `acked <= next <= end` and `end - acked <= max`. Bytes below `acked` are gone
/// for good, so nothing outside `[acked, end)` can ever be emitted (the OpenSSH roaming leak,
/// CVE-2016-0777, sent stale buffer memory).
#[derive(Debug)]
pub(crate) struct SendBuffer {
    buf: VecDeque<u8>,
    /// Stream offset of `buf[0]`: everything below was acknowledged.
    acked: u64,
    /// Next offset to transmit on the current transport.
    next: u64,
    /// Highest offset ever transmitted (on any transport): an ack beyond it is a lie.
    sent_max: u64,
    max: usize,
    /// The app finished: the stream ends at `end()`.
    fin: bool,
    /// The fin went out on the current transport.
    fin_sent: bool,
    /// The fin went out on some transport (an ack of `end + 1` is then legitimate).
    fin_sent_ever: bool,
    /// The peer acknowledged or reported receiving the fin.
    fin_acked: bool,
}

impl SendBuffer {
    pub(crate) fn new(max: usize) -> SendBuffer {
        SendBuffer {
            buf: VecDeque::new(),
            acked: 0,
            next: 0,
            sent_max: 0,
            max,
            fin: false,
            fin_sent: false,
            fin_sent_ever: false,
            fin_acked: false,
        }
    }

    pub(crate) fn end(&self) -> u64 {
        self.acked + self.buf.len() as u64
    }

    #[cfg(test)]
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        if self.fin { 0 } else { self.max - self.buf.len() }
    }

    /// Takes as much of `data` as fits; returns how much.
    pub(crate) fn write(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.capacity());
        self.buf.extend(&data[..n]);
        n
    }

    pub(crate) fn finish(&mut self) {
        self.fin = true;
    }

    pub(crate) fn fin_acked(&self) -> bool {
        self.fin_acked
    }

    /// The next chunk to transmit, at most `max` bytes, copied out of the ring.
    pub(crate) fn next_chunk(&mut self, max: usize) -> Option<(u64, Bytes)> {
        let end = self.end();
        if self.next >= end || max == 0 {
            return None;
        }
        let start = (self.next - self.acked) as usize;
        let len = ((end - self.next) as usize).min(max);
        // Copied slice by slice (memcpy), not byte by byte through the ring's iterator.
        let mut chunk = Vec::with_capacity(len);
        let (front, back) = self.buf.as_slices();
        let end_at = start + len;
        if start < front.len() {
            chunk.extend_from_slice(&front[start..end_at.min(front.len())]);
        }
        if end_at > front.len() {
            chunk.extend_from_slice(&back[start.saturating_sub(front.len())..end_at - front.len()]);
        }
        debug_assert_eq!(chunk.len(), len);
        let offset = self.next;
        self.next += len as u64;
        self.sent_max = self.sent_max.max(self.next);
        debug_assert!(offset >= self.acked && self.next <= end, "emitting outside the unacked window");
        Some((offset, Bytes::from(chunk)))
    }

    /// The fin is due once everything before it went out on this transport.
    pub(crate) fn fin_due(&self) -> bool {
        self.fin && !self.fin_sent && !self.fin_acked && self.next == self.end()
    }

    pub(crate) fn mark_fin_sent(&mut self) {
        self.fin_sent = true;
        self.fin_sent_ever = true;
    }

    /// Highest acknowledgement value the peer may legitimately send.
    fn ack_limit(&self) -> u64 {
        self.sent_max + u64::from(self.fin_sent_ever)
    }

    /// A cumulative acknowledgement. Stale acks are ignored; an ack of something never sent
    /// is a protocol violation.
    pub(crate) fn on_ack(&mut self, ack: u64) -> Result<(), ProtocolError> {
        if ack > self.ack_limit() {
            return Err(ProtocolError::AckBeyondSent { ack, sent: self.ack_limit() });
        }
        let data_ack = ack.min(self.end());
        if data_ack > self.acked {
            let n = (data_ack - self.acked) as usize;
            self.buf.drain(..n);
            self.acked = data_ack;
            // `next` can lag behind an ack only if the peer got bytes from an older transport
            // that we are about to retransmit; skip them.
            self.next = self.next.max(self.acked);
        }
        if self.fin_sent_ever && ack == self.end() + 1 {
            self.fin_acked = true;
        }
        Ok(())
    }

    /// A new transport starts: the peer says it holds everything below `peer_received` (plus
    /// one for our fin). Retransmission restarts there. Returns an error when the value
    /// cannot come from an honest peer: below what it already acknowledged (it lost bytes we
    /// discarded) or beyond what we ever sent.
    pub(crate) fn rewind(&mut self, peer_received: u64) -> Result<(), String> {
        if peer_received < self.acked {
            return Err(format!("peer resumes at {peer_received}, but acknowledged up to {}", self.acked));
        }
        if peer_received > self.ack_limit() {
            return Err(format!("peer resumes at {peer_received}, but we only sent {}", self.ack_limit()));
        }
        self.fin_sent = false;
        if self.fin_sent_ever && peer_received == self.end() + 1 {
            // It has everything including the fin: as good as an ack for closing. The bytes
            // themselves stay until acked, so acks keep bounding the peer's receive queue.
            self.fin_acked = true;
            self.next = self.end();
        } else {
            self.next = peer_received.min(self.end());
        }
        Ok(())
    }
}

/// In-order reassembly of the peer's stream and the queue the driver reads from. Bytes count
/// as acknowledged only once the driver took them (`read`), so the peer's replay buffer is
/// also the flow-control window: a stalled app stops acks, the peer's buffer fills, and its
/// app is pushed back, while heartbeats keep flowing.
#[derive(Debug)]
pub(crate) struct RecvBuffer {
    queue: VecDeque<Bytes>,
    queued: usize,
    /// Next expected offset.
    received: u64,
    /// Bytes handed to the driver.
    consumed: u64,
    fin: Option<u64>,
    fin_delivered: bool,
    limit: usize,
}

impl RecvBuffer {
    pub(crate) fn new(limit: usize) -> RecvBuffer {
        RecvBuffer {
            queue: VecDeque::new(),
            queued: 0,
            received: 0,
            consumed: 0,
            fin: None,
            fin_delivered: false,
            limit,
        }
    }

    /// Accepts a data frame; returns how many new bytes it added. Duplicates (a retransmission
    /// of something we already have) are ignored. A gap cannot happen on an in-order transport
    /// from an honest peer, so it is an error.
    pub(crate) fn on_data(&mut self, offset: u64, data: Bytes) -> Result<usize, ProtocolError> {
        let end = offset.checked_add(data.len() as u64).ok_or(ProtocolError::Overflow)?;
        if let Some(fin) = self.fin
            && end > fin
        {
            return Err(ProtocolError::DataAfterFin { fin });
        }
        if offset > self.received {
            return Err(ProtocolError::Gap { offset, expected: self.received });
        }
        if end <= self.received {
            return Ok(0);
        }
        let fresh = data.slice((self.received - offset) as usize..);
        let n = fresh.len();
        if self.queued + n > self.limit {
            return Err(ProtocolError::ReceiveQueueFull { limit: self.limit });
        }
        self.queued += n;
        self.received = end;
        self.queue.push_back(fresh);
        Ok(n)
    }

    pub(crate) fn on_fin(&mut self, offset: u64) -> Result<(), ProtocolError> {
        match self.fin {
            Some(f) if f == offset => Ok(()),
            Some(f) => Err(ProtocolError::BadFin { offset, received: f }),
            None if offset == self.received => {
                self.fin = Some(offset);
                Ok(())
            }
            None => Err(ProtocolError::BadFin { offset, received: self.received }),
        }
    }

    /// The next chunk for the app.
    pub(crate) fn read(&mut self) -> Option<Bytes> {
        let chunk = self.queue.pop_front()?;
        self.queued -= chunk.len();
        self.consumed += chunk.len() as u64;
        Some(chunk)
    }

    /// True once, when the fin has arrived and every byte before it was read.
    pub(crate) fn take_fin(&mut self) -> bool {
        if self.fin.is_some() && self.queue.is_empty() && !self.fin_delivered {
            self.fin_delivered = true;
            true
        } else {
            false
        }
    }

    pub(crate) fn fin_delivered(&self) -> bool {
        self.fin_delivered
    }

    /// What we tell a resuming peer: where its retransmission should start.
    pub(crate) fn received_pos(&self) -> u64 {
        self.received + u64::from(self.fin.is_some())
    }

    /// What we acknowledge: bytes the driver took (plus one for a delivered fin).
    pub(crate) fn ack_pos(&self) -> u64 {
        self.consumed + u64::from(self.fin_delivered)
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    #[cfg(test)]
    pub(crate) fn consumed(&self) -> u64 {
        self.consumed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_buffer_is_bounded_and_trimmed_by_acks() {
        let mut s = SendBuffer::new(10);
        assert_eq!(s.write(b"0123456789abc"), 10);
        assert_eq!(s.write(b"x"), 0);
        assert_eq!(s.next_chunk(4), Some((0, Bytes::from_static(b"0123"))));
        assert_eq!(s.next_chunk(100), Some((4, Bytes::from_static(b"456789"))));
        assert_eq!(s.next_chunk(100), None);
        s.on_ack(3).unwrap();
        assert_eq!(s.capacity(), 3);
        assert_eq!(s.write(b"abcd"), 3);
        // Ack beyond what was transmitted (10) is refused and changes nothing.
        assert!(s.on_ack(11).is_err());
        assert_eq!(s.acked(), 3);
        // Stale ack ignored.
        s.on_ack(1).unwrap();
        assert_eq!(s.acked(), 3);
        // Resume: the peer has 5; retransmit from there.
        s.rewind(5).unwrap();
        assert_eq!(s.next_chunk(2), Some((5, Bytes::from_static(b"56"))));
        assert!(s.rewind(2).is_err(), "below acked");
        assert!(s.rewind(14).is_err(), "beyond sent");
    }

    #[test]
    fn never_emits_outside_the_unacked_window() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
        // Random writes, transmissions, acks and resumes; every emitted chunk must lie in
        // [acked, end) and carry exactly the stream's bytes at its offset.
        for seed in 0..50 {
            let mut rng = StdRng::seed_from_u64(seed);
            let stream: Vec<u8> = (0..200_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
            let mut s = SendBuffer::new(rng.random_range(1..5000));
            let mut written = 0usize;
            let mut peer_has = 0u64; // what an honest peer received
            for _ in 0..2000 {
                match rng.random_range(0..4) {
                    0 => {
                        let n = rng.random_range(0..3000).min(stream.len() - written);
                        written += s.write(&stream[written..written + n]);
                    }
                    1 => {
                        if let Some((offset, data)) = s.next_chunk(rng.random_range(1..2000)) {
                            assert!(offset >= s.acked() && offset + data.len() as u64 <= s.end(), "seed {seed}");
                            let o = offset as usize;
                            assert_eq!(&data[..], &stream[o..o + data.len()], "seed {seed}");
                            // In-order transport: the peer takes it if it is next.
                            if offset <= peer_has {
                                peer_has = peer_has.max(offset + data.len() as u64);
                            }
                        }
                    }
                    2 => {
                        let ack = rng.random_range(s.acked()..=peer_has);
                        s.on_ack(ack).unwrap();
                        assert!(s.end() - s.acked() <= s.max as u64);
                    }
                    _ => s.rewind(peer_has).unwrap(),
                }
            }
        }
    }

    #[test]
    fn fin_accounting() {
        let mut s = SendBuffer::new(10);
        s.write(b"abc");
        s.finish();
        assert_eq!(s.capacity(), 0);
        assert!(!s.fin_due());
        s.next_chunk(10);
        assert!(s.fin_due());
        s.mark_fin_sent();
        assert!(!s.fin_due());
        s.on_ack(3).unwrap();
        assert!(!s.fin_acked());
        s.on_ack(4).unwrap();
        assert!(s.fin_acked());
        assert!(s.on_ack(5).is_err());
    }

    #[test]
    fn recv_in_order_exactly_once() {
        let mut r = RecvBuffer::new(100);
        assert_eq!(r.on_data(0, Bytes::from_static(b"abc")).unwrap(), 3);
        assert_eq!(r.on_data(0, Bytes::from_static(b"abc")).unwrap(), 0);
        assert_eq!(r.on_data(1, Bytes::from_static(b"bcde")).unwrap(), 2);
        assert!(matches!(r.on_data(9, Bytes::from_static(b"z")), Err(ProtocolError::Gap { .. })));
        assert!(matches!(r.on_data(u64::MAX, Bytes::from_static(b"zz")), Err(ProtocolError::Overflow)));
        assert!(r.on_fin(3).is_err());
        r.on_fin(5).unwrap();
        r.on_fin(5).unwrap();
        assert!(matches!(r.on_data(4, Bytes::from_static(b"ef")), Err(ProtocolError::DataAfterFin { .. })));
        assert_eq!(r.received_pos(), 6);
        assert_eq!(r.ack_pos(), 0);
        assert!(!r.take_fin());
        let mut got = Vec::new();
        while let Some(c) = r.read() {
            got.extend_from_slice(&c);
        }
        assert_eq!(got, b"abcde");
        assert!(r.take_fin());
        assert!(!r.take_fin());
        assert_eq!(r.ack_pos(), 6);
    }

    #[test]
    fn recv_queue_is_limited() {
        let mut r = RecvBuffer::new(4);
        r.on_data(0, Bytes::from_static(b"abc")).unwrap();
        assert!(matches!(r.on_data(3, Bytes::from_static(b"de")), Err(ProtocolError::ReceiveQueueFull { .. })));
        r.read();
        r.on_data(3, Bytes::from_static(b"de")).unwrap();
    }
}
