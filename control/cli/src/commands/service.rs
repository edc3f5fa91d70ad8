//! `meshctl service`: services and their endpoints.

use anyhow::Context;
use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::proto::pb;

use super::output::{Format, render};

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Create a service and place its endpoints.
    Create {
        name: String,
        /// A network the service is on (repeat for several).
        #[arg(long = "network", required = true)]
        networks: Vec<String>,
        /// PORT[/tcp|/udp|/http] (repeat for several). `http`: the mesh checks every request
        /// against the policy (HTTP/1.1, HTTP/2, gRPC); `tcp`: only the connection.
        #[arg(long = "port")]
        ports: Vec<String>,
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// node.labels.KEY==VALUE or node.id==ID (repeat for several; all must hold).
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// The command each endpoint's workload runs.
        #[arg(long)]
        command: Option<String>,
    },
    /// List services.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one service with its endpoints.
    Inspect { name: String },
    /// Change the number of endpoints.
    Scale { name: String, replicas: u32 },
    /// Remove a service and its endpoints.
    Rm { name: String },
}

/// Runs `meshctl service ...` against the leader.
pub async fn run(cmd: ServiceCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { name, networks, ports, replicas, constraints, command } => {
            let ports = ports.iter().map(|p| parse_port(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let request = pb::CreateServiceRequest {
                name,
                networks,
                ports,
                replicas,
                constraints,
                command: command.unwrap_or_default(),
            };
            let s = client.create_service(request).await?;
            println!("service {} created with {} endpoint(s)", s.name, s.endpoints.len());
            for (network, vip) in &s.vips {
                println!("  {network}: virtual IP {vip}");
            }
        }
        ServiceCmd::Ls { format } => {
            let services = client.list_services().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&services)?),
                Format::Table => print!(
                    "{}",
                    render(
                        &["NAME", "NETWORKS", "PORTS", "REPLICAS", "VIRTUAL IPS"],
                        services.iter().map(|s| vec![
                            s.name.clone(),
                            s.networks.join(","),
                            if s.ports.is_empty() { "-".to_owned() } else { s.ports.join(",") },
                            format!("{}/{}", s.endpoints.len(), s.replicas),
                            s.vips.values().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
                        ])
                    )
                ),
            }
        }
        ServiceCmd::Inspect { name } => {
            println!("{}", serde_json::to_string_pretty(&client.inspect_service(&name).await?)?)
        }
        ServiceCmd::Scale { name, replicas } => {
            let s = client.scale_service(&name, replicas).await?;
            println!("service {} scaled: {}/{} endpoint(s)", s.name, s.endpoints.len(), s.replicas);
        }
        ServiceCmd::Rm { name } => {
            println!("service {} removed", client.remove_service(&name).await?.name)
        }
    }
    Ok(())
}

fn parse_port(text: &str) -> anyhow::Result<pb::Port> {
    let (port, protocol) = text.split_once('/').unwrap_or((text, "tcp"));
    let port: u16 = port.parse().ok().filter(|p| *p != 0).with_context(|| {
        format!("port `{text}` is not valid: expected PORT[/tcp|/udp|/http] with PORT in 1-65535")
    })?;
    anyhow::ensure!(
        matches!(protocol, "tcp" | "udp" | "http"),
        "port `{text}` has protocol `{protocol}`: expected tcp, udp or http"
    );
    Ok(pb::Port { port: port.into(), protocol: protocol.to_owned() })
}
