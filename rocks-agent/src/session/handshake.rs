//! Noise handshake construction and the key derivations around it: the PSK from the cluster
//! secret, the per-session resume secret, and the resume proofs. Why each exists is argued in
//! `docs/protocol.md` ("Security argument").

use blake2::{Blake2sMac256, digest::Mac as _};
use snow::{HandshakeState, TransportState};

use crate::secret::Secret;

/// Pattern and primitives. NN: no static keys (the cluster secret is the only identity);
/// psk0: the PSK is mixed in before msg1, so msg1 already proves possession of the secret and
/// a wrong secret fails on the responder's first read.
const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Mixed into the handshake hash: a handshake of another protocol or version never verifies.
const PROLOGUE: &[u8] = b"rocks session protocol v1";

const LABEL_PSK: &[u8] = b"rocks v1 psk";
const LABEL_RESUME_SECRET: &[u8] = b"rocks v1 resume secret";
const LABEL_PROOF_RESPONDER: &[u8] = b"rocks v1 resume proof responder";
const LABEL_PROOF_INITIATOR: &[u8] = b"rocks v1 resume proof initiator";

pub(crate) type Key = [u8; 32];

/// Keyed BLAKE2s over the concatenation of `parts`.
fn mac(key: &[u8; 32], parts: &[&[u8]]) -> Key {
    // Keys of 32 bytes are always valid for BLAKE2s, so this cannot fail.
    let mut m = <Blake2sMac256 as blake2::digest::KeyInit>::new_from_slice(key).expect("BLAKE2s accepts 32-byte keys");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The Noise PSK. Derived rather than the raw secret so the secret file's bytes are used for
/// exactly one purpose under one label (domain separation from any future use).
fn psk(secret: &Secret) -> Key {
    mac(secret.as_bytes(), &[LABEL_PSK])
}

fn build(secret: &Secret, initiator: bool) -> HandshakeState {
    let psk = psk(secret);
    let builder = snow::Builder::new(NOISE_PARAMS.parse().expect("valid Noise parameters"))
        .psk(0, &psk)
        .and_then(|b| b.prologue(PROLOGUE))
        .expect("psk and prologue are set once");
    // Only fails if a primitive is missing from the build (a compile-time feature matter).
    let hs = if initiator { builder.build_initiator() } else { builder.build_responder() };
    hs.expect("snow built with 25519, ChaChaPoly and BLAKE2s")
}

pub(crate) fn initiator(secret: &Secret) -> HandshakeState {
    build(secret, true)
}

pub(crate) fn responder(secret: &Secret) -> HandshakeState {
    build(secret, false)
}

/// The handshake hash as a fixed array (BLAKE2s: 32 bytes).
pub(crate) fn handshake_hash(hs: &HandshakeState) -> Key {
    let mut h = [0u8; 32];
    let src = hs.get_handshake_hash();
    let n = src.len().min(32);
    h[..n].copy_from_slice(&src[..n]);
    h
}

/// The per-session resume secret: bound to the initial handshake (its hash) and to a random
/// seed the responder sent inside msg2. msg2's payload is encrypted under a key that depends
/// on both ephemeral keys, so unlike the handshake hash alone (which any holder of the
/// cluster secret who recorded the handshake can recompute), the seed is known only to the
/// two agents of this session.
pub(crate) fn resume_secret(initial_hash: &Key, seed: &Key) -> Key {
    mac(seed, &[LABEL_RESUME_SECRET, initial_hash])
}

/// Responder's proof in a resume msg2, over the handshake hash after msg1 (which covers the
/// initiator's fresh ephemeral key and the encrypted resume request).
pub(crate) fn responder_proof(resume_secret: &Key, hash_after_msg1: &Key) -> Key {
    mac(resume_secret, &[LABEL_PROOF_RESPONDER, hash_after_msg1])
}

/// Initiator's proof in `ResumeConfirm`, over the final handshake hash (both ephemerals).
pub(crate) fn initiator_proof(resume_secret: &Key, final_hash: &Key) -> Key {
    mac(resume_secret, &[LABEL_PROOF_INITIATOR, final_hash])
}

/// Random bytes from the thread-local CSPRNG (session ids, resume seeds).
pub(crate) fn random<const N: usize>() -> [u8; N] {
    use rand::RngCore as _;
    let mut b = [0u8; N];
    rand::rng().fill_bytes(&mut b);
    b
}

/// Constant-time comparison, so a forger learns nothing from timing.
pub(crate) fn ct_eq(a: &Key, b: &Key) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Writes one handshake message with `payload`. Our payloads are tiny, so the only failure
/// would be a snow state bug; it is reported, not unwrapped.
pub(crate) fn write(hs: &mut HandshakeState, payload: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; payload.len() + 128];
    let n = hs.write_message(payload, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Reads one handshake message, returning its payload.
pub(crate) fn read(hs: &mut HandshakeState, msg: &[u8]) -> Result<Vec<u8>, snow::Error> {
    let mut buf = vec![0u8; msg.len()];
    let n = hs.read_message(msg, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

/// Encrypts one frame on an established transport (tests build records by hand with it).
#[cfg(test)]
pub(crate) fn seal(ts: &mut TransportState, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), snow::Error> {
    out.clear();
    out.resize(plaintext.len() + super::wire::TAG_LEN, 0);
    let n = ts.write_message(plaintext, out)?;
    out.truncate(n);
    Ok(())
}

/// Encrypts one frame straight into `out` as a record (length, then ciphertext and tag), so the
/// ciphertext is written once, where it is sent from. On failure `out` is left as it was.
pub(crate) fn seal_record(
    ts: &mut TransportState,
    plaintext: &[u8],
    out: &mut bytes::BytesMut,
) -> Result<(), snow::Error> {
    let start = out.len();
    let sealed_len = plaintext.len() + super::wire::TAG_LEN;
    out.resize(start + 2 + sealed_len, 0);
    match ts.write_message(plaintext, &mut out[start + 2..]) {
        Ok(n) => {
            debug_assert!(n <= super::wire::MAX_RECORD);
            out.truncate(start + 2 + n);
            out[start..start + 2].copy_from_slice(&(n as u16).to_be_bytes());
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Decrypts one record on an established transport. Any failure (forged, replayed,
/// reordered, truncated) means the transport can no longer be trusted.
pub(crate) fn open(ts: &mut TransportState, record: &[u8]) -> Result<Vec<u8>, snow::Error> {
    if record.len() < super::wire::TAG_LEN {
        return Err(snow::Error::Decrypt);
    }
    let mut buf = vec![0u8; record.len()];
    let n = ts.read_message(record, &mut buf)?;
    buf.truncate(n);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_completes_with_same_secret_and_fails_with_another() {
        let secret = Secret::generate();
        let mut i = initiator(&secret);
        let mut r = responder(&secret);
        let m1 = write(&mut i, b"hello").unwrap();
        assert_eq!(read(&mut r, &m1).unwrap(), b"hello");
        let m2 = write(&mut r, b"answer").unwrap();
        assert_eq!(read(&mut i, &m2).unwrap(), b"answer");
        assert_eq!(handshake_hash(&i), handshake_hash(&r));
        let mut ti = i.into_transport_mode().unwrap();
        let mut tr = r.into_transport_mode().unwrap();
        let mut rec = Vec::new();
        seal(&mut ti, b"frame", &mut rec).unwrap();
        assert_eq!(open(&mut tr, &rec).unwrap(), b"frame");
        // The same record again (a replay) no longer decrypts: nonces count up.
        assert!(open(&mut tr, &rec).is_err());

        let mut other = responder(&Secret::generate());
        let m1 = write(&mut initiator(&secret), b"hello").unwrap();
        assert!(read(&mut other, &m1).is_err());
    }

    #[test]
    fn proofs_are_distinct_per_role_and_transcript() {
        let rs = [1u8; 32];
        let h1 = [2u8; 32];
        let h2 = [3u8; 32];
        assert_ne!(responder_proof(&rs, &h1), initiator_proof(&rs, &h1));
        assert_ne!(initiator_proof(&rs, &h1), initiator_proof(&rs, &h2));
        assert_ne!(initiator_proof(&rs, &h1), initiator_proof(&[9; 32], &h1));
        assert!(ct_eq(&h1, &h1) && !ct_eq(&h1, &h2));
    }
}
