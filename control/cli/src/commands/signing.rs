//! The operator's side of signed specs: the spec-signing key meshctl was given, the cluster it
//! signs for (from the admin certificate), and the digests of the secrets this operator made
//! (kept beside the key: a manager's word on a secret's bytes is never signed).

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
    cluster: String,
}

impl Signer {
    pub fn load(path: &Path, cluster: &str) -> anyhow::Result<Signer> {
        let key = SigningKey::load(path)
            .with_context(|| format!("cannot read the spec-signing key {}", path.display()))?;
        Ok(Signer { key, digests: path.with_extension("secrets"), cluster: cluster.to_owned() })
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
    /// this cluster and this service: the only base an update is signed on.
    pub fn verified(&self, name: &str, spec: Option<&SignedSpec>) -> anyhow::Result<SpecDocument> {
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
        Ok(document)
    }

    /// Signs service `name` running `command` as `run` on `networks`, as an update of `base` (a
    /// verified document: the one its rollback returns to) or a new service; each secret's
    /// digest is the one `base` or this operator's record holds. Shows what it signs.
    pub fn sign(
        &self,
        name: &str,
        command: &Option<String>,
        run: &RunSpec,
        networks: &[String],
        base: Option<&SpecDocument>,
    ) -> anyhow::Result<pb::SignedSpec> {
        let no_secrets = BTreeMap::new();
        let known = base.map_or(&no_secrets, |b| &b.secrets);
        let recorded = self.digests()?;
        let mut secrets = BTreeMap::new();
        for secret in &run.secrets {
            let digest = known.get(secret).or_else(|| recorded.get(secret)).with_context(|| {
                format!(
                    "secret `{secret}` has no digest recorded in {}: create it with `meshctl --spec-key ... secret create` so that its bytes are signed",
                    self.digests.display()
                )
            })?;
            secrets.insert(secret.clone(), digest.clone());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        // Later than what it updates, whatever this machine's clock says: nodes order a
        // service's documents by it.
        let signed_at = base.map_or(now, |b| now.max(b.signed_at + 1));
        let mut document = SpecDocument::new(
            &self.cluster,
            name,
            command.clone(),
            run.clone(),
            networks,
            secrets,
            signed_at,
        );
        if let Some(base) = base {
            document = document.rolling_back_to(base.signed_at);
        }
        let signed = self.key.sign(&document);
        eprintln!("signing: {}", signed.document);
        Ok(pb::SignedSpec { document: signed.document, signature: signed.signature })
    }
}
