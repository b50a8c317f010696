//! `rocks-testpeer`'s wire protocol, data pattern and JSON reports, shared by the binary and
//! the tests that read its output.
//!
//! One connection (integers big-endian):
//!
//! 1. client → server, request header, [`REQUEST_LEN`] bytes:
//!    magic `RKTPREQ1`, `up_len` u64, `down_len` u64, `seed` u64, `flags` u32 (reserved, 0).
//! 2. server → client, response header: magic `RKTPRSP1`, u16 length, then the client address
//!    the server's `accept()` returned, as text ("192.0.2.1:40000", "[2001:db8::1]:40000").
//! 3. concurrently: client → server `up_len` bytes of `Pattern::new(seed, Up)`, and server →
//!    client `down_len` bytes of `Pattern::new(seed, Down)`.
//! 4. server → client, trailer, [`TRAILER_LEN`] bytes: sha256 of the upload as received, then
//!    sha256 of the download as sent. Then the server half-closes.
//! 5. the client half-closes once its upload is sent and the trailer read; both sides read to
//!    EOF (nothing may follow) and close.
//!
//! Both directions are checked twice: byte by byte against the pattern as bytes arrive (which
//! locates the first bad byte), and by comparing the sender's and receiver's sha256.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

pub const REQUEST_MAGIC: [u8; 8] = *b"RKTPREQ1";
pub const RESPONSE_MAGIC: [u8; 8] = *b"RKTPRSP1";
pub const REQUEST_LEN: usize = 36;
pub const TRAILER_LEN: usize = 64;
/// Pattern generation and I/O unit.
pub const BLOCK: usize = 64 * 1024;

/// The request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub up_len: u64,
    pub down_len: u64,
    pub seed: u64,
    pub flags: u32,
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[..8].copy_from_slice(&REQUEST_MAGIC);
        b[8..16].copy_from_slice(&self.up_len.to_be_bytes());
        b[16..24].copy_from_slice(&self.down_len.to_be_bytes());
        b[24..32].copy_from_slice(&self.seed.to_be_bytes());
        b[32..36].copy_from_slice(&self.flags.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<Request, String> {
        if b[..8] != REQUEST_MAGIC {
            return Err(format!("bad request magic {:02x?}", &b[..8]));
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
        Ok(Request {
            up_len: u64_at(8),
            down_len: u64_at(16),
            seed: u64_at(24),
            flags: u32::from_be_bytes(b[32..36].try_into().unwrap()),
        })
    }
}

/// The response header carrying the peer address the server saw.
pub fn encode_response_header(peer: &str) -> Vec<u8> {
    let len = u16::try_from(peer.len()).expect("address text fits in u16");
    let mut b = RESPONSE_MAGIC.to_vec();
    b.extend_from_slice(&len.to_be_bytes());
    b.extend_from_slice(peer.as_bytes());
    b
}

/// Reads a response header, returning the peer address text.
pub fn read_response_header(r: &mut impl Read) -> io::Result<String> {
    let mut head = [0u8; 10];
    r.read_exact(&mut head)?;
    if head[..8] != RESPONSE_MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response magic {:02x?}", &head[..8]),
        ));
    }
    let mut text = vec![0u8; u16::from_be_bytes([head[8], head[9]]).into()];
    r.read_exact(&mut text)?;
    String::from_utf8(text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// The deterministic byte stream of one direction: splitmix64 words, little-endian, generated
/// a block at a time. Any split of the stream into reads or writes yields the same bytes, and
/// it runs at several GB/s, far above what the tests push through a connection.
pub struct Pattern {
    state: u64,
    block: Vec<u8>,
    pos: usize,
    offset: u64,
}

impl Pattern {
    pub fn new(seed: u64, dir: Direction) -> Pattern {
        // Distinct per direction, so a reflected upload never passes as the download.
        let tweak = match dir {
            Direction::Up => 0x7570_7570_7570_7570,
            Direction::Down => 0x646f_776e_646f_776e,
        };
        Pattern {
            state: seed ^ tweak,
            block: vec![0; BLOCK],
            pos: BLOCK,
            offset: 0,
        }
    }

    fn refill(&mut self) {
        for word in self.block.chunks_exact_mut(8) {
            word.copy_from_slice(&splitmix64(&mut self.state).to_le_bytes());
        }
        self.pos = 0;
    }

    /// The next up to `max` bytes of the stream (less at a block boundary).
    pub fn next_chunk(&mut self, max: usize) -> &[u8] {
        if self.pos == BLOCK {
            self.refill();
        }
        let n = max.min(BLOCK - self.pos);
        let start = self.pos;
        self.pos += n;
        self.offset += n as u64;
        &self.block[start..start + n]
    }

    /// Checks that `data` continues the stream. On a mismatch returns the stream offset of the
    /// first wrong byte (the pattern's position is then unspecified).
    pub fn verify(&mut self, data: &[u8]) -> Result<(), u64> {
        let mut done = 0;
        while done < data.len() {
            let base = self.offset;
            let expected = self.next_chunk(data.len() - done);
            let got = &data[done..done + expected.len()];
            if got != expected {
                let i = got
                    .iter()
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                return Err(base + i as u64);
            }
            done += expected.len();
        }
        Ok(())
    }

    /// Bytes produced so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a byte count: a plain number, or with a suffix K/M/G/T (also KiB, MiB...; powers of
/// 1024) or KB/MB/GB/TB (powers of 1000). Case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "bad size unit in {s:?} (use K, M, G, T, KiB..., KB...)"
            ));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

/// What `rocks-testpeer client` prints (one JSON object on stdout).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientReport {
    /// getpeername() right after connect: the server address as the program sees it.
    pub peername: String,
    /// getsockname() right after connect.
    pub sockname: String,
    /// The client address the server's accept() returned.
    pub server_saw_peer: String,
    /// Bytes uploaded / downloaded (equal to the requested sizes on success).
    pub up: u64,
    pub down: u64,
    /// The server's sha256 of what it received equals ours of what we sent.
    pub up_sha256_match: bool,
    /// Every downloaded byte matched the pattern, and our sha256 of it equals the server's of
    /// what it sent.
    pub down_sha256_match: bool,
    pub up_sha256: String,
    pub down_sha256: String,
    /// Time connect() took.
    pub connect_us: u64,
    /// From before connect() until the server's response header (its first bytes) arrived:
    /// the connection's setup time as the program feels it, whatever connect() returned.
    #[serde(default)]
    pub first_byte_us: u64,
    /// From before connect() to the final EOF.
    pub total_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ClientReport {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.up_sha256_match && self.down_sha256_match
    }
}

/// What `rocks-testpeer serve` prints per connection (one JSON line on stdout).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// The client address accept() returned (IPv4-mapped addresses shown as IPv4).
    pub peer: String,
    /// The server's own address of the connection.
    pub local: String,
    pub up: u64,
    pub down: u64,
    pub flags: u32,
    /// sha256 of the upload as received / of the download as sent.
    pub up_sha256: String,
    pub down_sha256: String,
    /// Stream offset of the first upload byte that did not match the pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub up_mismatch_at: Option<u64>,
    pub total_ms: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Parses the server's stdout, one record per line.
pub fn parse_server_log(stdout: &str) -> serde_json::Result<Vec<ServerRecord>> {
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect()
}

/// What `rocks-testpeer getpeername` prints.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddrReport {
    pub peername: String,
    pub sockname: String,
    pub connect_us: u64,
}

/// What `rocks-testpeer storm` prints: many connections opened at once, each running the
/// protocol with small transfers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    /// Connections asked for.
    pub count: u64,
    /// connect() succeeded.
    pub connected: u64,
    /// Transfers that completed byte-exact both ways (pattern and sha256 on both ends), and
    /// whose getpeername() showed the address dialed.
    pub ok: u64,
    /// Connections whose getsockname() was a loopback address: redirected to a local agent.
    pub via_loopback: u64,
    /// From the first connect() until every connect() had returned.
    pub connect_ms: u64,
    /// From the first connect() until the last connection closed.
    pub total_ms: u64,
    /// Distinct errors with how many connections hit each (empty when all succeeded).
    #[serde(default)]
    pub errors: Vec<(String, u64)>,
}

impl StormReport {
    pub fn all_ok(&self) -> bool {
        self.ok == self.count && self.errors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_independent_of_chunking() {
        let mut whole = Pattern::new(7, Direction::Up);
        let mut expected = Vec::new();
        while expected.len() < 3 * BLOCK + 5 {
            let n = (3 * BLOCK + 5 - expected.len()).min(BLOCK);
            expected.extend_from_slice(whole.next_chunk(n));
        }
        let mut odd = Pattern::new(7, Direction::Up);
        let mut i = 0;
        for step in [1, 7, 4096, BLOCK - 3, BLOCK, 100_000].iter().cycle() {
            if i >= expected.len() {
                break;
            }
            let end = (i + step).min(expected.len());
            odd.verify(&expected[i..end]).unwrap();
            i = end;
        }
        assert_eq!(odd.offset(), expected.len() as u64);
    }

    #[test]
    fn pattern_locates_first_bad_byte_and_differs_by_direction_and_seed() {
        let mut p = Pattern::new(1, Direction::Down);
        let mut data = p.next_chunk(BLOCK).to_vec();
        data.extend_from_slice(p.next_chunk(BLOCK));
        data[BLOCK + 10] ^= 1;
        assert_eq!(
            Pattern::new(1, Direction::Down).verify(&data),
            Err(BLOCK as u64 + 10)
        );
        assert!(Pattern::new(1, Direction::Up).verify(&data[..64]).is_err());
        assert!(
            Pattern::new(2, Direction::Down)
                .verify(&data[..64])
                .is_err()
        );
    }

    #[test]
    fn headers_round_trip() {
        let r = Request {
            up_len: 1 << 40,
            down_len: 3,
            seed: u64::MAX,
            flags: 5,
        };
        assert_eq!(Request::decode(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[0] = b'X';
        assert!(Request::decode(&bad).is_err());
        let h = encode_response_header("[2001:db8::1]:4000");
        assert_eq!(
            read_response_header(&mut &h[..]).unwrap(),
            "[2001:db8::1]:4000"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("100MiB"), Ok(100 << 20));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
