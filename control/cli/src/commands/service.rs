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
        /// The command each endpoint's workload runs (`sh -c`), confined: a user of its own
        /// with no capabilities, its own mount and PID namespaces, the host's files read-only, a
        /// private /tmp, the node's state hidden.
        #[arg(long)]
        command: Option<String>,
        #[command(flatten)]
        run: Box<RunArgs>,
    },
    /// List services.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one service with its endpoints.
    Inspect { name: String },
    /// Each endpoint of a service: its node, addresses and state as its node reports it
    /// (starting, running, restarting, failed, ready; pending until it reports), restarts,
    /// since when, and how its command last ended.
    Ps {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// What the service's workloads wrote (stdout and stderr, each line prefixed by its
    /// endpoint), fetched through control from the nodes that run them.
    Logs {
        name: String,
        /// Keep printing new lines (every second) until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Only the last N lines of each endpoint (default: all its node keeps, up to 2,000).
        #[arg(long, value_name = "N")]
        tail: Option<u32>,
        /// Only lines written in the last DURATION (e.g. 30s, 10m, 2h).
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        since: Option<std::time::Duration>,
    },
    /// Change the number of endpoints.
    Scale { name: String, replicas: u32 },
    /// Remove a service and its endpoints.
    Rm { name: String },
}

/// How the command runs: its user, environment, secrets, writable paths and limits.
#[derive(clap::Args)]
pub struct RunArgs {
    /// Run as NAME, UID or UID:GID of the node instead of a user of the workload's own
    /// (never root).
    #[arg(long)]
    user: Option<String>,
    /// NAME=VALUE in the command's environment (repeat for several). The command starts with
    /// nothing of meshd's: only PATH and HOME=/tmp, which these may replace.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A secret (`meshctl secret create`) the workload reads at /run/secrets/NAME, its own
    /// (mode 0400); repeat for several.
    #[arg(long = "secret", value_name = "NAME")]
    secrets: Vec<String>,
    /// A host path the workload may write (it must exist; repeat for several).
    #[arg(long = "writable", value_name = "PATH")]
    writable: Vec<String>,
    /// A host path the workload reads where its own /tmp, /var/tmp or /run would cover it
    /// (read-only; it must exist; repeat for several). The rest of the host's files it reads
    /// anyway, read-only.
    #[arg(long = "readable", value_name = "PATH")]
    readable: Vec<String>,
    /// At most this many CPUs (e.g. 0.5).
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus)]
    limit_cpu: Option<u32>,
    /// At most this much memory: BYTES, or with a suffix K, M or G (powers of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    limit_memory: Option<u64>,
}

impl RunArgs {
    fn into_wire(self) -> pb::RunSpec {
        pb::RunSpec {
            user: self.user.unwrap_or_default(),
            writable: self.writable,
            readable: self.readable,
            cpu_millis: self.limit_cpu.unwrap_or(0),
            memory_bytes: self.limit_memory.unwrap_or(0),
            env: self.env,
            secrets: self.secrets,
        }
    }
}

/// Runs `meshctl service ...` against the leader.
pub async fn run(cmd: ServiceCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { name, networks, ports, replicas, constraints, command, run } => {
            let ports = ports.iter().map(|p| parse_port(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let request = pb::CreateServiceRequest {
                name,
                networks,
                ports,
                replicas,
                constraints,
                command: command.unwrap_or_default(),
                run: Some(run.into_wire()),
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
                            format!("{}/{}", s.running, s.replicas),
                            s.vips.values().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
                        ])
                    )
                ),
            }
        }
        ServiceCmd::Inspect { name } => {
            println!("{}", serde_json::to_string_pretty(&client.inspect_service(&name).await?)?)
        }
        ServiceCmd::Ps { name, format } => {
            let endpoints = client.service_ps(&name).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&endpoints)?),
                Format::Table => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    print!(
                        "{}",
                        render(
                            &["SLOT", "NODE", "HOST", "ADDRESSES", "STATE", "RESTARTS", "SINCE", "LAST EXIT"],
                            endpoints.iter().map(|e| vec![
                                format!("{name}.{}", e.slot),
                                e.node.to_string(),
                                e.hostname.clone(),
                                e.addresses.values().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
                                e.state.clone(),
                                e.restarts.to_string(),
                                if e.since == 0 {
                                    "-".into()
                                } else {
                                    format!("{}s ago", (now - e.since).max(0))
                                },
                                e.last_exit.clone().unwrap_or_else(|| "-".into()),
                            ])
                        )
                    )
                }
            }
        }
        ServiceCmd::Logs { name, follow, tail, since } => logs(client, &name, follow, tail, since).await?,
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

/// Prints what `name`'s endpoints wrote, oldest first, and with `follow` what they write next.
async fn logs(
    client: &mut AdminClient,
    name: &str,
    follow: bool,
    tail: Option<u32>,
    since: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let now_millis = || {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    };
    let mut since_millis = since.map_or(0, |d| now_millis() - d.as_millis() as i64);
    let mut tail = tail.unwrap_or(0);
    // Lines printed at the newest millisecond seen, per endpoint: the next poll asks from that
    // millisecond on and skips them.
    let mut printed_at: std::collections::HashMap<u32, (i64, Vec<String>)> = Default::default();
    loop {
        let endpoints = client.service_logs(name, tail, since_millis).await?;
        let mut lines: Vec<(i64, u32, &mesh_api::model::LogLine)> = Vec::new();
        for e in &endpoints {
            if let Some(error) = &e.error {
                eprintln!("{name}.{}: {error}", e.slot);
            }
            let (at, seen) = printed_at.get(&e.slot).cloned().unwrap_or_default();
            for l in &e.lines {
                if l.at_millis < at || (l.at_millis == at && seen.contains(&l.text)) {
                    continue;
                }
                lines.push((l.at_millis, e.slot, l));
            }
        }
        lines.sort_by_key(|(at, slot, _)| (*at, *slot));
        for (at, slot, line) in &lines {
            println!("{name}.{slot} | {}", line.text);
            let entry = printed_at.entry(*slot).or_default();
            if entry.0 != *at {
                *entry = (*at, Vec::new());
            }
            entry.1.push(line.text.clone());
        }
        if !follow {
            return Ok(());
        }
        if let Some(newest) = printed_at.values().map(|(at, _)| *at).min() {
            since_millis = since_millis.max(newest);
        }
        // After the first answer, everything new.
        tail = 0;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
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

/// CPUs (`0.5`, `2`) in thousandths.
fn parse_cpus(text: &str) -> Result<u32, String> {
    let cpus: f64 = text.parse().map_err(|_| format!("`{text}` is not a number of CPUs (e.g. 0.5 or 2)"))?;
    let millis = (cpus * 1000.0).round();
    if !(1.0..=f64::from(mesh_api::model::MAX_CPU_MILLIS)).contains(&millis) {
        return Err(format!("{text} CPUs: from 0.001 to 1024"));
    }
    Ok(millis as u32)
}

/// A size in bytes: `BYTES`, or `N` followed by K, M or G (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("`{text}` is not a size: BYTES, or a number followed by K, M or G");
    let (number, shift) = match text.char_indices().last().ok_or_else(bad)? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_as_an_admin_writes_them() {
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("-1").is_err());
        assert!(parse_cpus("lots").is_err());
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("M").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
