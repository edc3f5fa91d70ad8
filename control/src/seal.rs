//! Encryption at rest of the manager's state: AES-256-GCM under a data key kept in its own file
//! (mode 0600). Sealed blobs are `MSEAL1 || nonce (12 bytes, random) || ciphertext+tag`; the
//! purpose of a blob is bound in as associated data, so a blob cannot be swapped for another kind.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use std::path::Path;

use crate::files::{self, FileError};
use crate::ids;

const MAGIC: &[u8] = b"MSEAL1";
const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed blob (wrong magic or too short)")]
    Format,
    #[error("sealed data failed authentication: wrong data key, or the file was altered")]
    Tag,
    #[error("the data key file {0} is malformed: expected 64 hex digits")]
    KeyFile(String),
    #[error(transparent)]
    File(#[from] FileError),
}

/// The key that encrypts the manager's state at rest.
#[derive(Clone)]
pub struct DataKey(Aes256Gcm, [u8; 32]);

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

impl DataKey {
    pub fn generate() -> DataKey {
        DataKey::from_bytes(ids::random_bytes::<32>())
    }

    pub fn from_bytes(bytes: [u8; 32]) -> DataKey {
        DataKey(Aes256Gcm::new(&bytes.into()), bytes)
    }

    pub fn load(path: &Path) -> Result<DataKey, SealError> {
        let text = files::read_string(path)?;
        let text = text.trim();
        let bad = || SealError::KeyFile(path.display().to_string());
        if text.len() != 64 || !text.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(DataKey::from_bytes(bytes))
    }

    pub fn save(&self, path: &Path) -> Result<(), FileError> {
        let hex: String = self.1.iter().map(|b| format!("{b:02x}")).collect();
        files::write_atomic(path, format!("{hex}\n").as_bytes(), files::SECRET)
    }

    pub fn seal(&self, plain: &[u8], purpose: &[u8]) -> Vec<u8> {
        let nonce = ids::random_bytes::<NONCE_LEN>();
        let sealed = self
            .0
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: purpose })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        [MAGIC, &nonce, &sealed].concat()
    }

    pub fn open(&self, blob: &[u8], purpose: &[u8]) -> Result<Vec<u8>, SealError> {
        let rest = blob.strip_prefix(MAGIC).ok_or(SealError::Format)?;
        if rest.len() < NONCE_LEN + 16 {
            return Err(SealError::Format);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad: purpose })
            .map_err(|_| SealError::Tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_tampering_wrong_key_and_wrong_purpose() {
        let key = DataKey::generate();
        let blob = key.seal(b"secret state", b"state");
        assert_eq!(key.open(&blob, b"state").unwrap(), b"secret state");
        assert!(!blob.windows(6).any(|w| w == b"secret"));
        let mut tampered = blob.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(key.open(&tampered, b"state"), Err(SealError::Tag)));
        assert!(matches!(key.open(&blob, b"log"), Err(SealError::Tag)));
        assert!(matches!(DataKey::generate().open(&blob, b"state"), Err(SealError::Tag)));
        assert!(matches!(key.open(b"MSEAL1short", b"state"), Err(SealError::Format)));
    }

    #[test]
    fn key_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let key = DataKey::generate();
        key.save(&dir.path().join("k")).unwrap();
        let again = DataKey::load(&dir.path().join("k")).unwrap();
        assert_eq!(again.open(&key.seal(b"x", b"p"), b"p").unwrap(), b"x");
    }
}
