//! Encryption at rest of the manager's state: AES-256-GCM under a data key kept in its own file
//! (mode 0600). Sealed blobs are `MSEAL1 || nonce (12 bytes, random) || ciphertext+tag`; the
//! purpose of a blob is bound in as associated data, so a blob cannot be swapped for another kind.
//!
//! With autolock on, the data key file holds the data key wrapped (sealed) by the cluster's
//! [`UnlockKey`], which no manager keeps on disk: a restarted manager cannot read its own state
//! until an operator gives it the key.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use std::path::Path;

use mesh_api::files::{self, FileError};
use mesh_api::ids;

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
    #[error("the data key file {0} is locked (autolock is on): unlock this manager with `meshctl unlock`")]
    Locked(String),
    #[error("wrong unlock key: it does not open this manager's data key")]
    WrongUnlockKey,
    #[error(transparent)]
    File(#[from] FileError),
}

/// The first word of a secret file sealed by the data key; hex of the sealed blob follows.
const SEALED_FILE: &str = "MESHSEALED1 ";

/// The first word of a locked data key file; hex of the wrapped key follows.
const LOCKED: &str = "MESHLOCK1 ";
const UNLOCK_PREFIX: &str = "MESHKEY-1-";

/// The key that wraps every manager's data key under autolock: `MESHKEY-1-<64 hex digits>`.
#[derive(Clone, PartialEq, Eq)]
pub struct UnlockKey([u8; 32]);

impl std::fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnlockKey(<redacted>)")
    }
}

impl std::fmt::Display for UnlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{UNLOCK_PREFIX}{}", hex(&self.0))
    }
}

/// Why a string is not an unlock key (without echoing it).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an unlock key is `MESHKEY-1-` and 64 hex digits")]
pub struct BadUnlockKey;

impl std::str::FromStr for UnlockKey {
    type Err = BadUnlockKey;
    fn from_str(s: &str) -> Result<UnlockKey, BadUnlockKey> {
        let digits = s.trim().strip_prefix(UNLOCK_PREFIX).ok_or(BadUnlockKey)?;
        unhex(digits).ok_or(BadUnlockKey).map(UnlockKey)
    }
}

impl UnlockKey {
    pub fn generate() -> UnlockKey {
        UnlockKey(ids::random_bytes::<32>())
    }

    fn kek(&self) -> DataKey {
        DataKey::from_bytes(self.0)
    }
}

/// What a data key file holds.
pub enum KeyFile {
    Plain(Box<DataKey>),
    /// Wrapped by the unlock key.
    Locked(Vec<u8>),
}

impl KeyFile {
    pub fn read(path: &Path) -> Result<KeyFile, SealError> {
        let text = files::read_string(path)?;
        let text = text.trim();
        let bad = || SealError::KeyFile(path.display().to_string());
        if let Some(wrapped) = text.strip_prefix(LOCKED) {
            return Ok(KeyFile::Locked(unhex_vec(wrapped).ok_or_else(bad)?));
        }
        Ok(KeyFile::Plain(Box::new(DataKey::from_bytes(unhex(text).ok_or_else(bad)?))))
    }

    /// The data key, unwrapping it with `unlock` when the file is locked.
    pub fn open(self, path: &Path, unlock: Option<&UnlockKey>) -> Result<DataKey, SealError> {
        match (self, unlock) {
            (KeyFile::Plain(key), _) => Ok(*key),
            (KeyFile::Locked(_), None) => Err(SealError::Locked(path.display().to_string())),
            (KeyFile::Locked(wrapped), Some(unlock)) => {
                let bytes =
                    unlock.kek().open(&wrapped, b"data-key").map_err(|_| SealError::WrongUnlockKey)?;
                let bytes: [u8; 32] = bytes.try_into().map_err(|_| SealError::WrongUnlockKey)?;
                Ok(DataKey::from_bytes(bytes))
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex_vec(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len() / 2).map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    unhex_vec(text)?.try_into().ok()
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

    /// The data key in `path`, or [`SealError::Locked`] if autolock wrapped it.
    pub fn load(path: &Path) -> Result<DataKey, SealError> {
        KeyFile::read(path)?.open(path, None)
    }

    /// Writes the key to `path`: in the clear, or wrapped by `unlock` under autolock.
    pub fn save(&self, path: &Path, unlock: Option<&UnlockKey>) -> Result<(), FileError> {
        let text = match unlock {
            None => hex(&self.1),
            Some(unlock) => format!("{LOCKED}{}", hex(&unlock.kek().seal(&self.1, b"data-key"))),
        };
        files::write_atomic(path, format!("{text}\n").as_bytes(), files::SECRET)
    }

    /// Writes `plain` to `path` (0600) sealed by this key for `purpose`.
    pub fn save_sealed(&self, path: &Path, plain: &[u8], purpose: &[u8]) -> Result<(), FileError> {
        let text = format!("{SEALED_FILE}{}\n", hex(&self.seal(plain, purpose)));
        files::write_atomic(path, text.as_bytes(), files::SECRET)
    }

    /// What [`DataKey::save_sealed`] wrote to `path` for `purpose`; `None` when the file is not
    /// sealed at all (as written before sealing, to be rewritten).
    pub fn load_sealed(&self, path: &Path, purpose: &[u8]) -> Result<Option<Vec<u8>>, SealError> {
        let text = files::read_string(path)?;
        let Some(sealed) = text.trim().strip_prefix(SEALED_FILE) else { return Ok(None) };
        let blob = unhex_vec(sealed).ok_or(SealError::Format)?;
        self.open(&blob, purpose).map(Some)
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
    fn a_sealed_file_opens_only_with_its_key_and_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let key = DataKey::generate();
        key.save_sealed(&path, b"-----BEGIN PRIVATE KEY-----", b"manager-key").unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(SEALED_FILE) && !text.contains("PRIVATE"), "{text}");
        assert_eq!(key.load_sealed(&path, b"manager-key").unwrap().unwrap(), b"-----BEGIN PRIVATE KEY-----");
        assert!(matches!(key.load_sealed(&path, b"other"), Err(SealError::Tag)));
        assert!(matches!(DataKey::generate().load_sealed(&path, b"manager-key"), Err(SealError::Tag)));
        std::fs::write(&path, "-----BEGIN PRIVATE KEY-----\n").unwrap();
        assert!(key.load_sealed(&path, b"manager-key").unwrap().is_none(), "not sealed");
        std::fs::write(&path, "MESHSEALED1 zz\n").unwrap();
        assert!(matches!(key.load_sealed(&path, b"manager-key"), Err(SealError::Format)));
    }

    #[test]
    fn key_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let key = DataKey::generate();
        key.save(&dir.path().join("k"), None).unwrap();
        let again = DataKey::load(&dir.path().join("k")).unwrap();
        assert_eq!(again.open(&key.seal(b"x", b"p"), b"p").unwrap(), b"x");
    }

    #[test]
    fn a_locked_key_file_opens_only_with_its_unlock_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let key = DataKey::generate();
        let unlock = UnlockKey::generate();
        key.save(&path, Some(&unlock)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(LOCKED) && !text.contains(&hex(&key.1)), "the key is not in the clear");
        assert!(matches!(DataKey::load(&path), Err(SealError::Locked(_))));
        let wrong = KeyFile::read(&path).unwrap().open(&path, Some(&UnlockKey::generate()));
        assert!(matches!(wrong, Err(SealError::WrongUnlockKey)));
        let opened = KeyFile::read(&path).unwrap().open(&path, Some(&unlock)).unwrap();
        assert_eq!(opened.open(&key.seal(b"x", b"p"), b"p").unwrap(), b"x");
        let parsed: UnlockKey = unlock.to_string().parse().unwrap();
        assert_eq!(parsed, unlock);
        assert!("MESHKEY-1-zz".parse::<UnlockKey>().is_err());
        assert!(!format!("{unlock:?}").contains(&hex(&unlock.0)));
    }
}
