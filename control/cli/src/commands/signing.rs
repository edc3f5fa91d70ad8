//! The operator's side of signed specs: the spec-signing key meshctl was given, the cluster it
//! signs for (from the admin certificate), the digests of the secrets this operator made, and
//! the newest document of each service this operator signed (both kept beside the key: a
//! manager's word on a secret's bytes, or on which version of a service is current, is never
//! signed on).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh_api::model::RunSpec;
use mesh_api::proto::pb;
use mesh_api::specs::{SignedSpec, SigningKey, SpecDocument};

pub struct Signer {
    key: SigningKey,
    /// `KEYFILE.secrets`: secret name -> SHA-256 (hex) of the bytes `secret create` sent.
    digests: PathBuf,
    /// `KEYFILE.signed`: service -> the newest document this operator had control take.
    signed: PathBuf,
    cluster: String,
}

/// The newest document of a service signed here, as `KEYFILE.signed` keeps it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Signed {
    /// The SHA-256 of the document, and of the one it rolls back to.
    digest: String,
    rollback_to: Option<String>,
    signed_at: i64,
}

impl Signer {
    pub fn load(path: &Path, cluster: &str) -> anyhow::Result<Signer> {
        let key = SigningKey::load(path)
            .with_context(|| format!("cannot read the spec-signing key {}", path.display()))?;
        Ok(Signer {
            key,
            digests: path.with_extension("secrets"),
            signed: path.with_extension("signed"),
            cluster: cluster.to_owned(),
        })
    }

    fn signed(&self) -> anyhow::Result<BTreeMap<String, Signed>> {
        match std::fs::read_to_string(&self.signed) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is unreadable", self.signed.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.signed.display())),
        }
    }

    /// Notes `spec` as the newest document of service `name` (once control took it).
    pub fn record_signed(&self, name: &str, spec: &pb::SignedSpec) -> anyhow::Result<()> {
        let spec = SignedSpec { document: spec.document.clone(), signature: spec.signature.clone() };
        let document = spec.read()?;
        let mut all = self.signed()?;
        let entry = Signed {
            digest: spec.digest(),
            rollback_to: document.rollback_to,
            signed_at: document.signed_at,
        };
        all.insert(name.to_owned(), entry);
        let text = serde_json::to_string_pretty(&all)?;
        mesh_api::files::write_atomic(&self.signed, text.as_bytes(), mesh_api::files::SECRET)?;
        Ok(())
    }

    fn digests(&self) -> anyhow::Result<BTreeMap<String, String>> {
        match std::fs::read_to_string(&self.digests) {
            Ok(text) => serde_json::from_str(&text)
                .with_context(|| format!("{} is unreadable", self.digests.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.digests.display())),
        }
    }

    /// Notes the digest of secret `name` as this operator made it.
    pub fn record_secret(&self, name: &str, digest: &str) -> anyhow::Result<()> {
        let mut all = self.digests()?;
        all.insert(name.to_owned(), digest.to_owned());
        let text = serde_json::to_string_pretty(&all)?;
        mesh_api::files::write_atomic(&self.digests, text.as_bytes(), mesh_api::files::SECRET)?;
        Ok(())
    }

    /// The document of the current version of `name`, once it verified against this key, for
    /// this cluster and this service, and it is the newest this operator signed for it (or the
    /// one that rolls back to): the only base an update is signed on. A manager answering with
    /// an older version the operator replaced would otherwise have it signed again as new.
    pub fn verified(
        &self,
        name: &str,
        spec: Option<&SignedSpec>,
    ) -> anyhow::Result<(SignedSpec, SpecDocument)> {
        let spec = spec.with_context(|| {
            format!("service `{name}`'s current version is not signed: there is nothing verified to sign the update on (remove and create it again with --spec-key)")
        })?;
        let document = self
            .key
            .public()
            .verify(spec)
            .with_context(|| format!("the spec control holds for `{name}` is not one this key signed"))?;
        anyhow::ensure!(
            document.service == name && document.cluster == self.cluster,
            "the spec control holds for `{name}` was signed for service `{}` of cluster {}",
            document.service,
            document.cluster
        );
        match self.signed()?.get(name) {
            Some(newest)
                if newest.digest != spec.digest() && newest.rollback_to.as_ref() != Some(&spec.digest()) =>
            {
                anyhow::bail!(
                    "the spec control holds for `{name}` (signed at {}) is neither the newest this key signed for it here (signed at {}, recorded in {}) nor the one that rolls back to: a manager may be replaying an old version. If another machine signed a newer one since, remove `{name}` from that file",
                    millis(document.signed_at),
                    millis(newest.signed_at),
                    self.signed.display()
                )
            }
            Some(_) => {}
            None => eprintln!(
                "note: no spec of `{name}` was signed with this key on this machine ({} has none): signing on the version control holds, signed at {}",
                self.signed.display(),
                millis(document.signed_at)
            ),
        }
        Ok((spec.clone(), document))
    }

    /// Signs service `name` running `command` as `run` on `networks`, as an update of `base` (a
    /// verified document: the one its rollback returns to) or a new service; each secret's
    /// digest is the one this operator recorded when it made the secret (or, for one made
    /// elsewhere, the one `base` signed; the two must agree). Shows what it signs.
    pub fn sign(
        &self,
        name: &str,
        command: &Option<String>,
        run: &RunSpec,
        networks: &[String],
        base: Option<&(SignedSpec, SpecDocument)>,
    ) -> anyhow::Result<pb::SignedSpec> {
        let recorded = self.digests()?;
        let mut secrets = BTreeMap::new();
        for secret in &run.secrets {
            let signed_before = base.and_then(|(_, b)| b.secrets.get(secret));
            let digest = match (recorded.get(secret), signed_before) {
                (Some(mine), Some(before)) if mine != before => anyhow::bail!(
                    "secret `{secret}`: the version control holds signed its bytes as sha256 {before}, but {} records sha256 {mine} for the secret this machine made",
                    self.digests.display()
                ),
                (Some(digest), _) | (None, Some(digest)) => digest,
                (None, None) => anyhow::bail!(
                    "secret `{secret}` has no digest recorded in {}: create it with `meshctl --spec-key ... secret create` so that its bytes are signed",
                    self.digests.display()
                ),
            };
            secrets.insert(secret.clone(), digest.clone());
        }
        let now = mesh_api::unix_millis();
        // Later than what it updates, whatever this machine's clock says: nodes order a
        // service's documents by it.
        let signed_at = match base {
            Some((_, b)) => now.max(
                b.signed_at.checked_add(1).context("the base spec's signing time is the last there is")?,
            ),
            None => now,
        };
        let mut document = SpecDocument::new(
            &self.cluster,
            name,
            command.clone(),
            run.clone(),
            networks,
            secrets,
            signed_at,
        );
        if let Some((signed, _)) = base {
            document = document.rolling_back_to(signed);
        }
        let signed = self.key.sign(&document);
        eprintln!("signing, at {}: {}", millis(signed_at), signed.document);
        Ok(pb::SignedSpec { document: signed.document, signature: signed.signature })
    }
}

/// Unix milliseconds, as a UTC time.
fn millis(at: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000)
        .map_or_else(|_| format!("{at} ms"), |t| t.to_string())
}
