//! Join tokens: `MESHTKN-1-<digest of the root CA certificate>-<secret>`.
//!
//! The digest pins the CA (a joining node refuses any other), the secret proves the right to join
//! with a role. Control keeps only a SHA-256 hash of each secret in the cluster state and compares
//! hashes in constant time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ids::{self, DIGEST_LEN, ID_LEN};

/// The grep-able prefix of every join token, with its format version.
pub const PREFIX: &str = "MESHTKN-1-";

/// What a certificate lets its holder be. The role of a node comes from the token it joined with,
/// never from its CSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Worker,
    Manager,
}

impl Role {
    /// The OU of certificates for this role.
    pub fn ou(self) -> &'static str {
        match self {
            Role::Worker => "mesh-worker",
            Role::Manager => "mesh-manager",
        }
    }

    pub fn from_ou(ou: &str) -> Option<Role> {
        match ou {
            "mesh-worker" => Some(Role::Worker),
            "mesh-manager" => Some(Role::Manager),
            _ => None,
        }
    }

    pub const ALL: [Role; 2] = [Role::Worker, Role::Manager];
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Worker => "worker",
            Role::Manager => "manager",
        })
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "worker" => Ok(Role::Worker),
            "manager" => Ok(Role::Manager),
            other => Err(format!("unknown role `{other}`: expected `worker` or `manager`")),
        }
    }
}

/// Why a string is not a join token. Says what was wrong without echoing the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("a join token starts with `{PREFIX}`")]
    Prefix,
    #[error("a join token is `{PREFIX}<CA digest>-<secret>`; this one has {0} characters after the prefix, expected {expected}", expected = DIGEST_LEN + 1 + ID_LEN)]
    Length(usize),
    #[error("the CA digest of a join token is {DIGEST_LEN} characters of 0-9a-z")]
    Digest,
    #[error("the secret of a join token is {ID_LEN} characters of 0-9a-z")]
    Secret,
}

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    ca_digest: String,
    secret: String,
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_digest", &self.ca_digest)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl JoinToken {
    /// A fresh token for the CA with this digest.
    pub fn generate(ca_digest: &str) -> JoinToken {
        JoinToken { ca_digest: ca_digest.to_owned(), secret: ids::random_base36_128() }
    }

    /// The base36 SHA-256 digest of the root CA certificate (DER) this token pins.
    pub fn ca_digest(&self) -> &str {
        &self.ca_digest
    }

    /// What control stores: the hash of the secret, never the secret.
    pub fn secret_hash(&self) -> SecretHash {
        SecretHash(Sha256::digest(self.secret.as_bytes()).into())
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}-{}", self.ca_digest, self.secret)
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<JoinToken, TokenError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        if rest.len() != DIGEST_LEN + 1 + ID_LEN || !rest.is_char_boundary(DIGEST_LEN) {
            return Err(TokenError::Length(rest.chars().count()));
        }
        let (digest, secret) = rest.split_at(DIGEST_LEN);
        let secret = secret.strip_prefix('-').ok_or(TokenError::Length(rest.len()))?;
        if !ids::is_digest(digest) {
            return Err(TokenError::Digest);
        }
        if !ids::is_id(secret) {
            return Err(TokenError::Secret);
        }
        Ok(JoinToken { ca_digest: digest.to_owned(), secret: secret.to_owned() })
    }
}

/// SHA-256 of a token secret, as kept in the cluster state.
#[derive(Clone, Copy, Serialize, Deserialize)]
pub struct SecretHash(#[serde(with = "hex32")] [u8; 32]);

impl SecretHash {
    /// Constant-time comparison: the time taken says nothing about how much of a guess was right.
    pub fn matches(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(D::Error::custom("expected 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(D::Error::custom)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> String {
        ids::digest_base36(b"a CA certificate")
    }

    #[test]
    fn round_trips_and_hides_the_secret_in_debug() {
        let token = JoinToken::generate(&digest());
        let text = token.to_string();
        assert!(text.starts_with(PREFIX));
        assert_eq!(text.len(), PREFIX.len() + DIGEST_LEN + 1 + ID_LEN);
        let parsed: JoinToken = text.parse().unwrap();
        assert_eq!(parsed, token);
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn malformed_tokens_are_named() {
        let good = JoinToken::generate(&digest()).to_string();
        let cases: Vec<(String, TokenError)> = vec![
            ("garbage".into(), TokenError::Prefix),
            (good[..good.len() - 3].into(), TokenError::Length(DIGEST_LEN + ID_LEN - 2)),
            (format!("{}X{}", &good[..PREFIX.len() + 3], &good[PREFIX.len() + 4..]), TokenError::Digest),
            (format!("{}Z", &good[..good.len() - 1]), TokenError::Secret),
            (
                good.replacen(
                    &format!("{}-", &good[PREFIX.len()..PREFIX.len() + DIGEST_LEN]),
                    &format!("{}_", &good[PREFIX.len()..PREFIX.len() + DIGEST_LEN]),
                    1,
                ),
                TokenError::Length(DIGEST_LEN + 1 + ID_LEN),
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(input.parse::<JoinToken>().unwrap_err(), expected, "{input}");
        }
    }

    #[test]
    fn hashes_match_only_the_same_secret() {
        let a = JoinToken::generate(&digest());
        let b = JoinToken::generate(&digest());
        assert!(a.secret_hash().matches(&a.secret_hash()));
        assert!(!a.secret_hash().matches(&b.secret_hash()));
        let json = serde_json::to_string(&a.secret_hash()).unwrap();
        let back: SecretHash = serde_json::from_str(&json).unwrap();
        assert!(back.matches(&a.secret_hash()));
    }
}
