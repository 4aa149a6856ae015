//! Persistent ed25519 identity keys.
//!
//! A key file holds the 32-byte ed25519 secret seed as 64 hex digits and a newline. The same
//! seed gives the libp2p identity (so the peer id is derived from it) and the
//! `ed25519-dalek` signing key the averaging protocol signs with, so a peer id verifies the
//! peer's protocol messages. Files are created with mode 0600, atomically (temp file, fsync,
//! rename), so a crash never leaves half a key behind.

use libp2p::identity::{self, Keypair};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a key file could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but does not hold a key.
    #[error(
        "key file {path} is not a diloco key ({reason}); move it away to create a new identity"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// An identity: the libp2p keypair and the raw 32-byte secret seed it came from.
#[derive(Clone)]
pub struct Identity {
    /// libp2p keypair (ed25519).
    pub keypair: Keypair,
    /// The ed25519 secret seed.
    pub secret: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.keypair.public().to_peer_id())
    }
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Self {
        let kp = identity::ed25519::Keypair::generate();
        let mut secret = [0u8; 32];
        secret.copy_from_slice(kp.secret().as_ref());
        Self::from_secret(secret)
    }

    /// The identity of a secret seed.
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let mut copy = secret;
        let keypair = match Keypair::ed25519_from_bytes(&mut copy) {
            Ok(kp) => kp,
            // Any 32 bytes are a valid ed25519 seed; this branch cannot be taken.
            Err(_) => unreachable!("every 32-byte string is an ed25519 secret"),
        };
        Self { keypair, secret }
    }

    /// The libp2p peer id.
    pub fn peer_id(&self) -> libp2p::PeerId {
        self.keypair.public().to_peer_id()
    }
}

/// Parses the text of a key file: 64 hex digits (surrounding whitespace allowed).
pub fn parse(text: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    if t.len() != 64 {
        return Err(format!(
            "expected 64 hex digits, found {} characters",
            t.len()
        ));
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(t, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Loads the identity in `path`, creating the file with a new random key if it is absent.
/// Returns the identity and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Identity, bool), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    match fs::read(path) {
        Ok(bytes) => {
            if bytes.len() > 1024 {
                return Err(KeyError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!("{} bytes long", bytes.len()),
                });
            }
            let text = String::from_utf8(bytes).map_err(|_| KeyError::Malformed {
                path: path.to_path_buf(),
                reason: "not text".into(),
            })?;
            let secret = parse(&text).map_err(|reason| KeyError::Malformed {
                path: path.to_path_buf(),
                reason,
            })?;
            Ok((Identity::from_secret(secret), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = Identity::generate();
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::create_dir_all(dir).map_err(io)?;
            }
            let tmp = path.with_extension("tmp");
            {
                let mut opts = fs::OpenOptions::new();
                opts.write(true).create(true).truncate(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                let mut f = opts.open(&tmp).map_err(io)?;
                f.write_all(format!("{}\n", hex::encode(id.secret)).as_bytes())
                    .map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            fs::rename(&tmp, path).map_err(io)?;
            Ok((id, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_load_gives_the_same_peer_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/node.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.peer_id(), b.peer_id());
        assert_eq!(a.secret, b.secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn malformed_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.key");
        for text in ["", "zz", &"g".repeat(64), &"a".repeat(63)] {
            fs::write(&path, text).unwrap();
            let err = load_or_create(&path).unwrap_err().to_string();
            assert!(err.contains("is not a diloco key"), "{err}");
        }
        // The bad file is kept, never overwritten.
        assert_eq!(fs::read_to_string(&path).unwrap(), "a".repeat(63));
    }

    #[test]
    fn parse_roundtrips_hex() {
        let id = Identity::generate();
        assert_eq!(parse(&hex::encode(id.secret)).unwrap(), id.secret);
    }
}
