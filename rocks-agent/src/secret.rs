//! The cluster secret: 32 random bytes shared by every agent of a cluster. It is the Noise
//! pre-shared key of the session handshake (see `docs/protocol.md`), so whoever holds it can
//! open and resume sessions. It never appears in logs: `Debug` and `Display` are redacted.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rand::RngCore as _;

/// Length of the secret in bytes.
pub const SECRET_LEN: usize = 32;

/// The shared cluster secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; SECRET_LEN]);

/// Why a secret file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("secret file {path} does not exist (create one with `rocks-agent keygen`)")]
    Missing { path: PathBuf },
    #[error("cannot read secret file {path}")]
    Unreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("secret file {path} must hold {expected} hex characters, found {found}")]
    WrongLength { path: PathBuf, expected: usize, found: usize },
    #[error("secret file {path} holds a character that is not hex at position {position}")]
    NotHex { path: PathBuf, position: usize },
    #[error("secret file {path} holds the all-zero secret, which is not a secret")]
    AllZero { path: PathBuf },
    #[error("refusing to overwrite existing file {path}")]
    Exists { path: PathBuf },
    #[error("cannot write secret file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl Secret {
    /// A fresh random secret from the operating system's generator (through `rand`'s
    /// thread-local CSPRNG, which is seeded from it).
    pub fn generate() -> Secret {
        let mut bytes = [0u8; SECRET_LEN];
        // An all-zero draw is astronomically unlikely, but `from_file` refuses it, so make
        // sure a generated secret can always be read back.
        while bytes == [0u8; SECRET_LEN] {
            rand::rng().fill_bytes(&mut bytes);
        }
        Secret(bytes)
    }

    /// Builds a secret from raw bytes (tests, and callers that keep the secret elsewhere).
    pub fn from_bytes(bytes: [u8; SECRET_LEN]) -> Secret {
        Secret(bytes)
    }

    /// The raw bytes, for the handshake only.
    pub fn as_bytes(&self) -> &[u8; SECRET_LEN] {
        &self.0
    }

    /// Reads a secret file: 64 hex characters, optionally surrounded by whitespace (a
    /// trailing newline from an editor or `echo` is the common case).
    pub fn from_file(path: &Path) -> Result<Secret, SecretError> {
        let text = match fs::read(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SecretError::Missing { path: path.to_owned() });
            }
            Err(source) => return Err(SecretError::Unreadable { path: path.to_owned(), source }),
        };
        Secret::parse_hex(text.trim_ascii()).map_err(|e| e.at(path))
    }

    /// Parses 64 hex characters (either case).
    fn parse_hex(raw: &[u8]) -> Result<Secret, ParseError> {
        if raw.len() != 2 * SECRET_LEN {
            return Err(ParseError::WrongLength(raw.len()));
        }
        let mut bytes = [0u8; SECRET_LEN];
        for (i, pair) in raw.chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or(ParseError::NotHex(2 * i))?;
            let lo = hex_value(pair[1]).ok_or(ParseError::NotHex(2 * i + 1))?;
            bytes[i] = (hi << 4) | lo;
        }
        if bytes == [0u8; SECRET_LEN] {
            return Err(ParseError::AllZero);
        }
        Ok(Secret(bytes))
    }

    /// The secret as 64 lowercase hex characters (what `write_new` stores).
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(2 * SECRET_LEN);
        for b in self.0 {
            out.push(DIGITS[usize::from(b >> 4)] as char);
            out.push(DIGITS[usize::from(b & 0xf)] as char);
        }
        out
    }

    /// Writes the secret to a new file with mode 0600. An existing file is never replaced: a
    /// cluster whose agents silently got a new secret would stop working.
    pub fn write_new(&self, path: &Path) -> Result<(), SecretError> {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                SecretError::Exists { path: path.to_owned() }
            } else {
                SecretError::Write { path: path.to_owned(), source }
            }
        })?;
        // The umask can only remove bits, and 0600 has none it would remove for the owner,
        // but set it explicitly anyway so the result never depends on the caller's umask.
        let written = file
            .set_permissions(fs::Permissions::from_mode(0o600))
            .and_then(|()| file.write_all(format!("{}\n", self.to_hex()).as_bytes()))
            .and_then(|()| file.sync_all());
        written.map_err(|source| SecretError::Write { path: path.to_owned(), source })
    }
}

/// Returns a warning when the secret file can be read by group or others. Not fatal (the
/// operator may have reasons, e.g. a read-only mount), so the CLI logs it and carries on.
pub fn check_permissions(path: &Path) -> Option<String> {
    let mode = fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "secret file {} has mode {:04o}: group or others can read it; run `chmod 600 {}`",
            path.display(),
            mode & 0o7777,
            path.display()
        )
    })
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A parse failure before the path is attached.
enum ParseError {
    WrongLength(usize),
    NotHex(usize),
    AllZero,
}

impl ParseError {
    fn at(self, path: &Path) -> SecretError {
        let path = path.to_owned();
        match self {
            ParseError::WrongLength(found) => SecretError::WrongLength { path, expected: 2 * SECRET_LEN, found },
            ParseError::NotHex(position) => SecretError::NotHex { path, position },
            ParseError::AllZero => SecretError::AllZero { path },
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            let mut name = [0u8; 8];
            rand::rng().fill_bytes(&mut name);
            let dir = std::env::temp_dir()
                .join(format!("rocks-secret-test-{}", name.iter().map(|b| format!("{b:02x}")).collect::<String>()));
            fs::create_dir(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn hex_round_trip_and_file_round_trip() {
        let dir = TempDir::new();
        let path = dir.0.join("secret");
        let secret = Secret::generate();
        assert_eq!(secret.to_hex().len(), 64);
        secret.write_new(&path).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap(), secret);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(check_permissions(&path), None);
    }

    #[test]
    fn write_new_refuses_to_overwrite() {
        let dir = TempDir::new();
        let path = dir.0.join("secret");
        Secret::generate().write_new(&path).unwrap();
        let before = fs::read(&path).unwrap();
        let err = Secret::generate().write_new(&path).unwrap_err();
        assert!(matches!(err, SecretError::Exists { .. }), "{err:?}");
        assert_eq!(fs::read(&path).unwrap(), before);
    }

    #[test]
    fn accepts_surrounding_whitespace_and_uppercase() {
        let dir = TempDir::new();
        let path = dir.0.join("secret");
        let secret = Secret::generate();
        fs::write(&path, format!("  {}\r\n\n", secret.to_hex().to_uppercase())).unwrap();
        assert_eq!(Secret::from_file(&path).unwrap(), secret);
    }

    #[test]
    fn typed_errors() {
        let dir = TempDir::new();
        let path = dir.0.join("secret");
        let err = Secret::from_file(&path).unwrap_err();
        assert!(matches!(&err, SecretError::Missing { path: p } if p == &path), "{err:?}");
        assert!(err.to_string().contains("does not exist"));

        fs::write(&path, "abcd\n").unwrap();
        assert!(matches!(
            Secret::from_file(&path).unwrap_err(),
            SecretError::WrongLength { expected: 64, found: 4, .. }
        ));

        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        fs::write(&path, &bad).unwrap();
        assert!(matches!(Secret::from_file(&path).unwrap_err(), SecretError::NotHex { position: 10, .. }));

        fs::write(&path, "0".repeat(64)).unwrap();
        assert!(matches!(Secret::from_file(&path).unwrap_err(), SecretError::AllZero { .. }));

        // Multi-byte UTF-8 characters are a clean error, not a slicing panic.
        fs::write(&path, "é".repeat(32)).unwrap();
        assert!(matches!(Secret::from_file(&path).unwrap_err(), SecretError::NotHex { .. }));

        // Not UTF-8 at all.
        fs::write(&path, [0xffu8; 64]).unwrap();
        assert!(matches!(Secret::from_file(&path).unwrap_err(), SecretError::NotHex { position: 0, .. }));

        // A directory is unreadable as a file.
        assert!(matches!(Secret::from_file(&dir.0).unwrap_err(), SecretError::Unreadable { .. }));
    }

    #[test]
    fn permission_warning() {
        let dir = TempDir::new();
        let path = dir.0.join("secret");
        Secret::generate().write_new(&path).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let warning = check_permissions(&path).expect("0644 must warn");
        assert!(warning.contains("0644"), "{warning}");
        assert_eq!(check_permissions(&dir.0.join("absent")), None);
    }

    #[test]
    fn never_printed() {
        let secret = Secret::generate();
        let hex = secret.to_hex();
        for shown in [format!("{secret:?}"), format!("{secret}"), format!("{secret:#?}")] {
            assert_eq!(shown, "Secret(<redacted>)");
            assert!(!shown.contains(&hex[..8]));
        }
    }
}
