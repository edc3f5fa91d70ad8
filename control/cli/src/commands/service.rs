//! `meshctl service`: services and their endpoints.

use super::signing::Signer;
use anyhow::Context;
use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::proto::pb;

use super::output::{Format, InspectArgs, ListArgs, data, render};

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
        /// [ingress:|host:]PUBLISHED:TARGET[/tcp|/http] (repeat for several): meshd listens on
        /// PUBLISHED in the host's namespace (ingress mode: on every node labelled
        /// ingress=true, or every node when none is; host mode: on the nodes running an
        /// endpoint) and carries each connection through the mesh to an endpoint's TARGET port,
        /// as the source `ingress`. Reachable only where a policy rule allows `from =
        /// ["ingress"]`; `/http` ports are decided per request.
        #[arg(long = "publish", value_name = "[MODE:]PUBLISHED:TARGET")]
        publish: Vec<String>,
        #[command(flatten)]
        run: Box<RunArgs>,
    },
    /// List services.
    Ls(ListArgs),
    /// Show one service with its endpoints.
    Inspect(InspectArgs),
    /// Each endpoint of a service: its node, addresses and state as its node reports it
    /// (starting, running, restarting, failed, ready; pending until it reports), restarts,
    /// since when, and how its command last ended.
    Ps {
        name: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only the endpoints' names (SERVICE.SLOT), one per line.
        #[arg(short, long)]
        quiet: bool,
        /// Only the published ports, on each node that publishes them: listening, failed (and
        /// why: the port is taken, say; the node tries again) or pending.
        #[arg(long = "published")]
        only_published: bool,
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
    /// Change a service in place. Replicas, constraints and ports change at once; a changed
    /// command, environment, user, secrets or limits is a new version, rolled out to the
    /// endpoints a batch at a time (each endpoint's workload restarted with it). Waits and
    /// shows progress until every endpoint runs it (unless --detach); on a paused update, no
    /// change resumes it.
    Update {
        name: String,
        #[command(flatten)]
        change: Box<UpdateArgs>,
    },
    /// Return the service's command and how it runs (environment, user, secrets, limits) to the
    /// version before the current one, rolled out like an update. Replicas, constraints and
    /// ports stay as they are.
    Rollback {
        name: String,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Remove a service and its endpoints.
    Rm { name: String },
}

/// What `service update` changes.
#[derive(clap::Args)]
pub struct UpdateArgs {
    /// The new command (`""`: none).
    #[arg(long)]
    command: Option<String>,
    /// NAME=VALUE set in the command's environment, replacing NAME's value (repeat).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env_add: Vec<String>,
    /// NAME removed from the command's environment (repeat).
    #[arg(long = "env-rm", value_name = "NAME")]
    env_rm: Vec<String>,
    /// Run as NAME, UID or UID:GID (`""`: a user of the workload's own).
    #[arg(long)]
    user: Option<String>,
    /// A secret added (repeat).
    #[arg(long = "secret-add", value_name = "NAME")]
    secret_add: Vec<String>,
    /// A secret no longer read (repeat).
    #[arg(long = "secret-rm", value_name = "NAME")]
    secret_rm: Vec<String>,
    /// At most this many CPUs (0: no limit).
    #[arg(long, value_name = "CPUS", value_parser = parse_cpus_or_none)]
    limit_cpu: Option<u32>,
    /// At most this much memory (0: no limit).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    limit_memory: Option<u64>,
    /// The number of endpoints (changed at once, as `service scale` does).
    #[arg(long)]
    replicas: Option<u32>,
    /// node.labels.KEY==VALUE or node.id==ID added (repeat); endpoints on nodes that no longer
    /// satisfy the constraints move at once.
    #[arg(long = "constraint-add", value_name = "CONSTRAINT")]
    constraint_add: Vec<String>,
    /// A constraint removed, as it was given (repeat).
    #[arg(long = "constraint-rm", value_name = "CONSTRAINT")]
    constraint_rm: Vec<String>,
    /// PORT[/tcp|/udp|/http] added (repeat).
    #[arg(long = "port-add", value_name = "PORT")]
    port_add: Vec<String>,
    /// PORT[/tcp|/udp|/http] removed (repeat).
    #[arg(long = "port-rm", value_name = "PORT")]
    port_rm: Vec<String>,
    /// [ingress:|host:]PUBLISHED:TARGET[/tcp|/http] published (repeat), as for `service create`.
    #[arg(long = "publish-add", value_name = "[MODE:]PUBLISHED:TARGET")]
    publish_add: Vec<String>,
    /// A published port no longer published, by its PUBLISHED number (repeat).
    #[arg(long = "publish-rm", value_name = "PUBLISHED")]
    publish_rm: Vec<u16>,
    /// A new version even if nothing of it changed: every endpoint restarted, in batches.
    #[arg(long)]
    force: bool,
    /// Change a signed service's command or run spec without signing it (refused otherwise):
    /// nodes that pin the operator's key will not run it.
    #[arg(long)]
    unsigned: bool,
    #[command(flatten)]
    rollout: RolloutArgs,
}

/// How a new version is rolled out.
#[derive(clap::Args)]
pub struct RolloutArgs {
    /// Endpoints updated at a time (0: all at once).
    #[arg(long, default_value_t = 1)]
    update_parallelism: u32,
    /// Wait between one batch being up and the next (e.g. 10s).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    update_delay: std::time::Duration,
    /// How long an updated endpoint must run before it counts as up; one that fails (cannot
    /// start, or its command exits) in that time fails the update.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    update_monitor: std::time::Duration,
    /// What a failed update does: pause (the endpoints updated so far keep the new version) or
    /// rollback (every endpoint returns to the version before).
    #[arg(long, default_value = "pause", value_parser = ["pause", "rollback"])]
    update_failure_action: String,
    /// Return at once instead of showing the update's progress until it ends.
    #[arg(long, short = 'd')]
    detach: bool,
}

impl RolloutArgs {
    fn wire(&self) -> pb::UpdateOptions {
        pb::UpdateOptions {
            parallelism: self.update_parallelism,
            delay_secs: self.update_delay.as_secs(),
            monitor_secs: self.update_monitor.as_secs(),
            on_failure: self.update_failure_action.clone(),
        }
    }
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
pub async fn run(cmd: ServiceCmd, client: &mut AdminClient, signer: Option<&Signer>) -> anyhow::Result<()> {
    match cmd {
        ServiceCmd::Create { name, networks, ports, replicas, constraints, command, publish, run } => {
            let ports = ports.iter().map(|p| parse_port(p)).collect::<anyhow::Result<Vec<_>>>()?;
            let run = run.into_wire();
            // Signed as control will read it.
            let command = command.filter(|c| !c.trim().is_empty());
            let signed =
                signer.map(|s| s.sign(&name, &command, &run.clone().into(), &networks, None)).transpose()?;
            let request = pb::CreateServiceRequest {
                name,
                networks,
                ports,
                replicas,
                constraints,
                command: command.unwrap_or_default(),
                run: Some(run),
                signed,
                publish,
            };
            let signed_spec = request.signed.clone();
            let s = client.create_service(request).await?;
            if let (Some(signer), Some(signed)) = (signer, &signed_spec) {
                signer.record_signed(&s.name, signed)?;
            }
            let signed = if s.signed { ", its spec signed" } else { "" };
            println!("service {} created with {} endpoint(s){signed}", s.name, s.endpoints.len());
            for (network, vip) in &s.vips {
                println!("  {network}: virtual IP {vip}");
            }
            for p in &s.publish {
                println!("  published: {p} (reachable where a policy rule allows from = [\"ingress\"])");
            }
        }
        ServiceCmd::Ls(ListArgs { format, quiet }) => {
            let services = client.list_services().await?;
            if quiet {
                services.iter().for_each(|n| println!("{}", n.name));
                return Ok(());
            }
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &services)?),
                Format::Table => print!(
                    "{}",
                    render(
                        &["NAME", "NETWORKS", "PORTS", "PUBLISHED", "REPLICAS", "VIRTUAL IPS"],
                        services.iter().map(|s| vec![
                            s.name.clone(),
                            s.networks.join(","),
                            if s.ports.is_empty() { "-".to_owned() } else { s.ports.join(",") },
                            if s.publish.is_empty() { "-".to_owned() } else { s.publish.join(",") },
                            format!("{}/{}", s.running, s.replicas),
                            s.vips.values().map(|v| v.to_string()).collect::<Vec<_>>().join(","),
                        ])
                    )
                ),
            }
        }
        ServiceCmd::Inspect(InspectArgs { name, format }) => {
            print!("{}", data(format.into(), &client.inspect_service(&name).await?)?)
        }
        ServiceCmd::Ps { name, format, quiet, only_published } => {
            let (endpoints, published) = client.service_ps_published(&name).await?;
            if quiet {
                endpoints.iter().for_each(|e| println!("{name}.{}", e.slot));
                return Ok(());
            }
            match format {
                Format::Json | Format::Yaml if only_published => print!("{}", data(format, &published)?),
                Format::Json | Format::Yaml => print!("{}", data(format, &endpoints)?),
                Format::Table if only_published => print!("{}", published_table(&published)),
                Format::Table => {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64);
                    print!(
                        "{}",
                        render(
                            &[
                                "SLOT",
                                "NODE",
                                "HOST",
                                "ADDRESSES",
                                "VERSION",
                                "STATE",
                                "RESTARTS",
                                "SINCE",
                                "LAST EXIT"
                            ],
                            endpoints.iter().map(|e| vec![
                                format!("{name}.{}", e.slot),
                                e.node.to_string(),
                                e.hostname.clone(),
                                e.addresses.values().map(|a| a.to_string()).collect::<Vec<_>>().join(","),
                                // What it is given, and (while its node still runs another)
                                // what it runs.
                                if e.state == "pending" || e.running_version == e.version {
                                    e.version.to_string()
                                } else {
                                    format!("{} (running {})", e.version, e.running_version)
                                },
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
                    );
                    if !published.is_empty() {
                        print!("\n{}", published_table(&published));
                    }
                }
            }
        }
        ServiceCmd::Logs { name, follow, tail, since } => logs(client, &name, follow, tail, since).await?,
        ServiceCmd::Scale { name, replicas } => {
            let s = client.scale_service(&name, replicas).await?;
            println!("service {} scaled: {}/{} endpoint(s)", s.name, s.endpoints.len(), s.replicas);
        }
        ServiceCmd::Update { name, change } => {
            let UpdateArgs {
                command,
                env_add,
                env_rm,
                user,
                secret_add,
                secret_rm,
                limit_cpu,
                limit_memory,
                replicas,
                constraint_add,
                constraint_rm,
                port_add,
                port_rm,
                publish_add,
                publish_rm,
                force,
                unsigned,
                rollout,
            } = *change;
            let ports =
                |list: &[String]| list.iter().map(|p| parse_port(p)).collect::<anyhow::Result<Vec<_>>>();
            let before = client.inspect_service(&name).await?;
            let mut request = pb::UpdateServiceRequest {
                name: name.clone(),
                command,
                env_add,
                env_rm,
                user,
                replicas,
                constraint_add,
                constraint_rm,
                port_add: ports(&port_add)?,
                port_rm: ports(&port_rm)?,
                options: Some(rollout.wire()),
                force,
                secret_add,
                secret_rm,
                cpu_millis: limit_cpu,
                memory_bytes: limit_memory,
                signed: None,
                unsigned,
                publish_add,
                publish_rm: publish_rm.into_iter().map(u32::from).collect(),
            };
            // The change applied to the current version as this key signed it (never to what a
            // manager says it is), signed when it changes or is restarted.
            if let Some(signer) = signer {
                let change = mesh_api::model::DefinitionChange::from(&request);
                let changes = change != mesh_api::model::DefinitionChange::default();
                if changes || force {
                    let base = signer.verified(&name, before.spec.as_ref())?;
                    let (command, run) =
                        change.apply(&base.1.command, &base.1.run).map_err(anyhow::Error::msg)?;
                    request.signed =
                        Some(signer.sign(&name, &command, &run, &base.1.networks, Some(&base))?);
                }
            }
            let signed = request.signed.clone();
            let s = client.update_service(request).await?;
            if let (Some(signer), Some(signed)) = (signer, &signed) {
                signer.record_signed(&name, signed)?;
            }
            // A new version, or a paused update resumed: followed; else nothing is rolled out.
            let rolling = |v: &mesh_api::proto::ServiceView| {
                (v.version, v.rollout.as_ref().map(|r| (r.state.clone(), r.started_at)))
            };
            let paused = s.rollout.as_ref().is_some_and(|r| r.state == "paused");
            if rolling(&s) == rolling(&before) && !paused {
                println!("service {name}: version {} (its command and how it runs unchanged)", s.version);
                println!("  {}/{} endpoint(s) running", s.running, s.replicas);
                return Ok(());
            }
            println!("service {name}: version {} (was {})", s.version, before.version);
            follow(client, s, rollout.detach, false).await?;
        }
        ServiceCmd::Rollback { name, rollout } => {
            let request = pb::RollbackServiceRequest { name: name.clone(), options: Some(rollout.wire()) };
            let before = client.inspect_service(&name).await?;
            let s = client.rollback_service(request).await?;
            println!("service {name}: rolling back to version {} (was {})", s.version, before.version);
            follow(client, s, rollout.detach, true).await?;
        }
        ServiceCmd::Rm { name } => {
            println!("service {} removed", client.remove_service(&name).await?.name)
        }
    }
    Ok(())
}

/// Shows a rolling update's progress (endpoints at the new version, of all) until it ends; an
/// error if it paused, or failed and rolled back (`asked_rollback`: a rollback was what was
/// asked for).
async fn follow(
    client: &mut AdminClient,
    mut s: mesh_api::proto::ServiceView,
    detach: bool,
    asked_rollback: bool,
) -> anyhow::Result<()> {
    let mut shown = None;
    loop {
        let Some(r) = s.rollout.clone() else { return Ok(()) };
        let line = format!(
            "  {}: {}/{} endpoint(s) at version {}{}",
            r.state,
            r.updated,
            r.total,
            s.version,
            if r.rollback { " (rollback)" } else { "" }
        );
        if shown.as_ref() != Some(&line) {
            println!("{line}");
            shown = Some(line);
        }
        match r.state.as_str() {
            "completed" if r.rollback && !asked_rollback => anyhow::bail!(
                "the update failed and was rolled back: every endpoint runs version {} again\n  {}",
                s.version,
                r.message.unwrap_or_default()
            ),
            "completed" => {
                println!("service {}: every endpoint runs version {}", s.name, s.version);
                return Ok(());
            }
            "paused" => anyhow::bail!(
                "the update paused: {}\n  fix it and run `meshctl service update {}` again to resume, or `meshctl service rollback {}`",
                r.message.unwrap_or_default(),
                s.name,
                s.name
            ),
            _ if detach => {
                println!(
                    "  follow it with `meshctl service inspect {}` or `meshctl service ps {}`",
                    s.name, s.name
                );
                return Ok(());
            }
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        s = client.inspect_service(&s.name).await?;
    }
}

/// Prints what `name`'s endpoints wrote, oldest first, and with `follow` what they write next.
async fn logs(
    client: &mut AdminClient,
    name: &str,
    follow: bool,
    tail: Option<u32>,
    since: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let now_millis = mesh_api::unix_millis;
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

/// The published ports on each node that publishes them.
fn published_table(published: &[mesh_api::proto::PublishedPsView]) -> String {
    render(
        &["PUBLISHED", "NODE", "HOST", "STATE", "ERROR"],
        published.iter().map(|p| {
            vec![
                p.publish.clone(),
                p.node.to_string(),
                p.hostname.clone(),
                p.state.clone(),
                p.error.clone().unwrap_or_else(|| "-".into()),
            ]
        }),
    )
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

/// CPUs as [`parse_cpus`] reads them, or 0: no limit.
fn parse_cpus_or_none(text: &str) -> Result<u32, String> {
    if text.trim() == "0" { Ok(0) } else { parse_cpus(text) }
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
