//! `meshctl network`: the overlay networks.

use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::model::Transport;

use super::output::{Format, InspectArgs, ListArgs, data, render};

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Create a network (encrypted unless --unencrypted).
    Create {
        name: String,
        /// IPv4 subnet in CIDR form, at most /29, not overlapping another network.
        #[arg(long)]
        subnet: String,
        /// How its datagrams are sealed: `aes-gcm`, with pair keys the managers derive and
        /// rotate, or `wireguard`, with keys only the two nodes of each pair know (Noise
        /// handshakes, forward secrecy): a manager that is compromised opens none of its traffic.
        #[arg(long, default_value = "aes-gcm", value_parser = ["aes-gcm", "wireguard"], conflicts_with = "unencrypted")]
        transport: String,
        /// No encryption at all: the underlay sees every packet.
        #[arg(long)]
        unencrypted: bool,
    },
    /// List networks.
    Ls(ListArgs),
    /// Show one network (never its key bytes).
    Inspect(InspectArgs),
    /// Remove a network (refused while services are attached).
    Rm { name: String },
    /// Rotate a network's key now (on a WireGuard network: every node on it makes a new static
    /// key pair).
    RotateKey { name: String },
}

/// Runs `meshctl network ...` against the leader.
pub async fn run(cmd: NetworkCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        NetworkCmd::Create { name, subnet, transport, unencrypted } => {
            let transport =
                if unencrypted { Transport::None } else { transport.parse().map_err(anyhow::Error::msg)? };
            let n = client.create_network_with(&name, &subnet, transport).await?;
            println!(
                "network {} created: {} (ID {}, {})",
                n.name,
                n.subnet,
                n.id,
                match n.transport {
                    Transport::None => "unencrypted".to_owned(),
                    t => format!("encrypted, {t}"),
                }
            );
        }
        NetworkCmd::Ls(ListArgs { format, quiet }) => {
            let networks = client.list_networks().await?;
            if quiet {
                networks.iter().for_each(|n| println!("{}", n.name));
                return Ok(());
            }
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &networks)?),
                Format::Table => print!(
                    "{}",
                    render(
                        &["NAME", "ID", "SUBNET", "TRANSPORT", "KEY EPOCH", "ENDPOINTS", "NODES"],
                        networks.iter().map(|n| vec![
                            n.name.clone(),
                            n.id.to_string(),
                            n.subnet.to_string(),
                            n.transport.to_string(),
                            n.key_epoch.map_or("-".to_owned(), |e| e.to_string()),
                            n.endpoints.to_string(),
                            n.nodes.len().to_string(),
                        ])
                    )
                ),
            }
        }
        NetworkCmd::Inspect(InspectArgs { name, format }) => {
            print!("{}", data(format.into(), &client.inspect_network(&name).await?)?)
        }
        NetworkCmd::Rm { name } => {
            println!("network {} removed", client.remove_network(&name).await?.name)
        }
        NetworkCmd::RotateKey { name } => {
            let n = client.rotate_network_key(&name).await?;
            println!("network {} key rotated: epoch {}", n.name, n.key_epoch.unwrap_or(0));
        }
    }
    Ok(())
}
