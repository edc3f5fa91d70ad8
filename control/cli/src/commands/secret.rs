//! `meshctl secret`: secrets services' workloads read at `/run/secrets/NAME`.

use std::io::Read;

use anyhow::Context;
use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::model::MAX_SECRET_BYTES;

use super::output::{Format, InspectArgs, ListArgs, data, render};

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Create a secret from FILE, or from stdin with `-`. It is sealed in the cluster's state,
    /// never shown again, and sent only to the nodes running a workload of a service that reads
    /// it (`service create --secret NAME`). A secret never changes: make a new one to replace it.
    Create {
        name: String,
        /// The file holding the secret's bytes (at most 64 KiB), or `-` for stdin.
        file: String,
    },
    /// List secrets: names, digests, sizes and the services that read them (never the bytes).
    Ls(ListArgs),
    /// Show one secret (never its bytes).
    Inspect(InspectArgs),
    /// Remove a secret; refused while a service reads it.
    Rm { name: String },
}

/// Runs `meshctl secret ...` against the leader.
pub async fn run(
    cmd: SecretCmd,
    client: &mut AdminClient,
    signer: Option<&super::signing::Signer>,
) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Create { name, file } => {
            let mut data = Vec::new();
            let limit = MAX_SECRET_BYTES as u64 + 1;
            if file == "-" {
                std::io::stdin()
                    .take(limit)
                    .read_to_end(&mut data)
                    .context("reading the secret from stdin")?;
            } else {
                std::fs::File::open(&file)
                    .and_then(|f| f.take(limit).read_to_end(&mut data))
                    .with_context(|| format!("reading the secret from {file}"))?;
            }
            anyhow::ensure!(data.len() <= MAX_SECRET_BYTES, "a secret is at most {MAX_SECRET_BYTES} bytes");
            let digest = mesh_api::specs::digest(&data);
            let s = client.create_secret(&name, data).await?;
            anyhow::ensure!(
                s.digest == digest,
                "control reports sha256 {} for the secret sent as {digest}",
                s.digest
            );
            if let Some(signer) = signer {
                // What specs that read it will sign: the bytes sent, not control's word.
                signer.record_secret(&name, &digest)?;
            }
            println!("secret {} created ({} bytes, sha256 {})", s.name, s.size, s.digest);
        }
        SecretCmd::Ls(ListArgs { format, quiet }) => {
            let secrets = client.list_secrets().await?;
            if quiet {
                secrets.iter().for_each(|n| println!("{}", n.name));
                return Ok(());
            }
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &secrets)?),
                Format::Table => print!(
                    "{}",
                    render(
                        &["NAME", "SIZE", "SHA256", "SERVICES"],
                        secrets.iter().map(|s| vec![
                            s.name.clone(),
                            s.size.to_string(),
                            s.digest[..16.min(s.digest.len())].to_owned(),
                            if s.services.is_empty() { "-".to_owned() } else { s.services.join(",") },
                        ])
                    )
                ),
            }
        }
        SecretCmd::Inspect(InspectArgs { name, format }) => {
            let secrets = client.list_secrets().await?;
            let s = secrets
                .iter()
                .find(|s| s.name == name)
                .with_context(|| format!("no secret named `{name}`"))?;
            print!("{}", data(format.into(), s)?);
        }
        SecretCmd::Rm { name } => println!("secret {} removed", client.remove_secret(&name).await?.name),
    }
    Ok(())
}
