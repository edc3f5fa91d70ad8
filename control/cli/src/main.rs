//! `meshctl`: the admin CLI of a mesh cluster.

use meshctl::lab;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use mesh_api::model::NodeState;
use mesh_api::proto::{NodeView, pb};
use mesh_api::tokens::Role;
use nix::sys::signal::{SigHandler, Signal, signal};
use time::OffsetDateTime;

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Administer a mesh cluster")]
struct Cli {
    /// The admin bundle directory made by `mesh-control init` (DIR/admin).
    #[arg(long, env = "MESHCTL_ADMIN", global = true)]
    admin: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Services and their endpoints.
    #[command(subcommand)]
    Service(ServiceCmd),
    /// The service-to-service ACL policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// A local cluster in network namespaces, as root: up, exec, status, down.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Cluster-wide settings: autolock and its unlock key.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Unlock managers that restarted locked (autolock): the unlock key is read from stdin.
    Unlock {
        /// The manager to unlock (host:port); default: every manager in the admin bundle.
        #[arg(long)]
        manager: Vec<String>,
    },
    /// Show (or rotate) the join token for workers or managers.
    JoinToken {
        #[arg(value_parser = ["worker", "manager"])]
        role: String,
        /// Replace the token: the old one stops working at once; joined nodes are unaffected.
        #[arg(long)]
        rotate: bool,
        /// Print only the token.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Change cluster settings.
    Update {
        /// Wrap every manager's data key with an unlock key (printed once), so a restarted
        /// manager serves nothing until `meshctl unlock`; `false` turns it off.
        #[arg(long, action = clap::ArgAction::Set, required = true)]
        autolock: bool,
    },
    /// Show the unlock key (autolock), or replace it with --rotate.
    UnlockKey {
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build N hosts on one bridge, start the managers and meshd, apply a spec (networks,
    /// services, policy, checks), check it and stop the leading manager to show a failover; the
    /// lab keeps running.
    Up {
        #[arg(long, default_value_t = 4)]
        hosts: usize,
        /// Managers (raft voters) on h1..hM, an odd number: 3 when there are 3 hosts or more, else 1.
        #[arg(long)]
        managers: Option<usize>,
        /// The spec (TOML): see examples/lab.toml.
        #[arg(long, default_value = "examples/lab.toml")]
        spec: PathBuf,
        /// Where the lab keeps its state and logs (and lab.env, its record for shell scripts).
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
        /// Only build the hosts, start the managers and meshd and join them: no spec, no checks.
        #[arg(long)]
        bare: bool,
        /// Start of every namespace's name (PREFIX-h1, PREFIX-br): one per lab on a machine.
        #[arg(long, default_value = lab::DEFAULT_PREFIX)]
        prefix: String,
        /// The underlay: host I gets the subnet's address 10+I.
        #[arg(long, default_value = lab::DEFAULT_SUBNET)]
        subnet: ipnet::Ipv4Net,
        /// Which hosts run meshd: every host, or only those without a manager.
        #[arg(long, value_enum, default_value_t = lab::MeshdOn::Every)]
        meshd: lab::MeshdOn,
    },
    /// Run a command in a host (h1..hN) or in a service's workload on it (h2/api):
    /// `meshctl lab exec h2/web -- curl -s http://api/v1/items`.
    Exec {
        /// HOST or HOST/SERVICE.
        target: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Show the lab: hosts, processes, nodes, services, namespaces.
    Status {
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Stop every process and remove every namespace and file the lab made.
    Down {
        #[arg(long, default_value = lab::DEFAULT_DIR)]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one node.
    Inspect {
        id: String,
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Remove a node: it is refused on every call from now on, its connections are cut, its
    /// endpoints move elsewhere and the keys of its networks rotate.
    Rm { id: String },
    /// Make a demoted manager vote again in the replicated store.
    Promote { id: String },
    /// Make a manager stop voting (it keeps a copy of the state); refused if the voters left
    /// could not make a majority.
    Demote { id: String },
    /// Change a node's labels (used by placement constraints).
    Update {
        id: String,
        /// KEY=VALUE
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        /// KEY
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
    },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network (encrypted unless --unencrypted).
    Create {
        name: String,
        /// IPv4 subnet in CIDR form, at most /29, not overlapping another network.
        #[arg(long)]
        subnet: String,
        #[arg(long)]
        unencrypted: bool,
    },
    /// List networks.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Show one network (never its key bytes).
    Inspect { name: String },
    /// Remove a network (refused while services are attached).
    Rm { name: String },
    /// Rotate a network's key now.
    RotateKey { name: String },
}

#[derive(Subcommand)]
enum ServiceCmd {
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

#[derive(Subcommand)]
enum PolicyCmd {
    /// Run a policy file's own tests locally (no cluster needed).
    Test { file: PathBuf },
    /// Validate a policy against the cluster, run its tests, and put it in force.
    Apply { file: PathBuf },
    /// Print the policy in force (or version N).
    Get {
        #[arg(long)]
        version: Option<u64>,
    },
    /// List the policy versions.
    History,
    /// Put version N back in force (as a new version).
    Rollback { version: u64 },
    /// Show the verdict for a request and the rule behind it.
    Explain {
        #[arg(long)]
        from: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        port: u16,
        /// HTTP method; leave out METHOD and PATH to ask about a TCP connection.
        method: Option<String>,
        /// Request path.
        path: Option<String>,
        /// A request header, `NAME: VALUE` (repeat for several).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Explain against this file instead of the policy in force.
        #[arg(long)]
        file: Option<PathBuf>,
    },
}

fn read_policy(file: &PathBuf) -> anyhow::Result<(String, String)> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok((file.display().to_string(), text))
}

/// `meshctl policy test`: parse, compile, run the file's tests.
fn policy_test(file: &PathBuf) -> anyhow::Result<()> {
    let (name, text) = read_policy(file)?;
    let policy = policy::Policy::parse(&name, &text)?;
    let failures = policy::Engine::compile(&policy).run_tests(&policy.tests);
    for f in &failures {
        println!("FAIL  {name}: {f}");
    }
    println!(
        "{name}: {} rule(s), {} test(s), {} passed, {} failed",
        policy.rules.len(),
        policy.tests.len(),
        policy.tests.len() - failures.len(),
        failures.len()
    );
    anyhow::ensure!(failures.is_empty(), "{} test(s) failed", failures.len());
    Ok(())
}

fn explain(
    policy: &policy::Policy,
    from: &str,
    to: &str,
    port: u16,
    method: Option<&str>,
    path: Option<&str>,
    headers: &[String],
) -> anyhow::Result<()> {
    let method = method
        .map(|m| {
            let upper = m.to_ascii_uppercase();
            policy::Method::parse(&upper).with_context(|| format!("unknown method `{m}`"))
        })
        .transpose()?;
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|h| {
            let (k, v) = h.split_once(':').with_context(|| format!("header `{h}` is not `NAME: VALUE`"))?;
            Ok((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        })
        .collect::<anyhow::Result<_>>()?;
    let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let request = policy::Request { from, to, port, method, path: path.unwrap_or("/"), headers: &pairs };
    let decision = policy::Engine::compile(policy).evaluate(&request);
    println!("{}: {}", policy::describe(&request), decision.reason());
    for (rule, action) in &decision.dry_run {
        println!("  dry run: {rule} would {action}");
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

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[tokio::main]
async fn main() {
    // Output piped into `head` or `grep -q` ends meshctl quietly when the pipe closes, as it
    // would any Unix tool, instead of a panic in `println!`.
    // SAFETY: the default disposition runs no code of ours, and sigaction is thread-safe.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    if let Err(e) = run().await {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Local commands: no cluster needed.
    match &cli.command {
        Cmd::Lab(LabCmd::Up { hosts, managers, spec, dir, bare, prefix, subnet, meshd }) => {
            return lab::up(&lab::UpOptions {
                hosts: *hosts,
                managers: *managers,
                spec: spec.clone(),
                dir: dir.clone(),
                prefix: prefix.clone(),
                subnet: *subnet,
                meshd: *meshd,
                bare: *bare,
            });
        }
        Cmd::Lab(LabCmd::Exec { target, command, dir }) => {
            std::process::exit(lab::exec(dir, target, command)?)
        }
        Cmd::Lab(LabCmd::Status { dir }) => return lab::status(dir),
        Cmd::Lab(LabCmd::Down { dir }) => return lab::down(dir),
        Cmd::Policy(PolicyCmd::Test { file }) => return policy_test(file),
        Cmd::Policy(PolicyCmd::Explain { from, to, port, method, path, headers, file: Some(file) }) => {
            let (name, text) = read_policy(file)?;
            let p = policy::Policy::parse(&name, &text)?;
            return explain(&p, from, to, *port, method.as_deref(), path.as_deref(), headers);
        }
        _ => {}
    }
    let admin_dir = cli.admin.context(
        "no admin bundle: pass --admin DIR or set MESHCTL_ADMIN (mesh-control init writes it to STATE_DIR/admin)",
    )?;
    let mut bundle = AdminBundle::load(&admin_dir)
        .with_context(|| format!("cannot read the admin bundle in {}", admin_dir.display()))?;
    if let Cmd::Unlock { manager } = &cli.command {
        return unlock(&bundle, manager).await;
    }
    let mut client = AdminClient::connect(&bundle).await?;
    // A bundle that cannot be written (read-only) still works with the managers it names.
    let _ = bundle.remember_managers(&admin_dir, client.managers());
    match cli.command {
        Cmd::Unlock { .. } => unreachable!("handled above"),
        Cmd::Cluster(ClusterCmd::Update { autolock }) => {
            let key = client.update_cluster(autolock).await?;
            if autolock {
                println!(
                    "Autolock is on. The unlock key (keep it safe; `meshctl cluster unlock-key` shows it):"
                );
                println!("    {key}");
                println!("A restarted manager serves nothing until given it: meshctl unlock");
            } else {
                println!("Autolock is off: managers keep their data key in the clear (mode 0600).");
            }
        }
        Cmd::Cluster(ClusterCmd::UnlockKey { rotate }) => {
            let key = client.unlock_key(rotate).await?;
            if rotate {
                println!("The unlock key was rotated; the previous one no longer unlocks any manager.");
            }
            println!("{key}");
        }
        Cmd::Node(NodeCmd::Promote { id }) => {
            let node = client.promote_node(&id).await?;
            println!("{} votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        Cmd::Node(NodeCmd::Demote { id }) => {
            let node = client.demote_node(&id).await?;
            println!("{} no longer votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        Cmd::Node(NodeCmd::Ls { format }) => {
            let nodes = client.list_nodes().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
                Format::Table => print!("{}", table(&nodes)),
            }
        }
        Cmd::Node(NodeCmd::Inspect { id, format }) => {
            let node = client.inspect_node(&id).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&node)?),
                Format::Table => print!("{}", table(std::slice::from_ref(&node))),
            }
        }
        Cmd::Node(NodeCmd::Rm { id }) => {
            let node = client.remove_node(&id).await?;
            println!("{} removed", node.id);
        }
        Cmd::Node(NodeCmd::Update { id, label_add, label_rm }) => {
            let node = client.update_node(&id, label_add, label_rm).await?;
            println!(
                "{} labels: {}",
                node.id,
                if node.labels.is_empty() { "-".to_owned() } else { node.labels.join(", ") }
            );
        }
        Cmd::Network(NetworkCmd::Create { name, subnet, unencrypted }) => {
            let n = client.create_network(&name, &subnet, !unencrypted).await?;
            println!(
                "network {} created: {} (ID {}, {})",
                n.name,
                n.subnet,
                n.id,
                if n.encrypted { "encrypted" } else { "unencrypted" }
            );
        }
        Cmd::Network(NetworkCmd::Ls { format }) => {
            let networks = client.list_networks().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&networks)?),
                Format::Table => print!(
                    "{}",
                    render(
                        &["NAME", "ID", "SUBNET", "ENCRYPTED", "KEY EPOCH", "ENDPOINTS", "NODES"],
                        networks.iter().map(|n| vec![
                            n.name.clone(),
                            n.id.to_string(),
                            n.subnet.to_string(),
                            if n.encrypted { "yes" } else { "no" }.to_owned(),
                            n.key_epoch.map_or("-".to_owned(), |e| e.to_string()),
                            n.endpoints.to_string(),
                            n.nodes.len().to_string(),
                        ])
                    )
                ),
            }
        }
        Cmd::Network(NetworkCmd::Inspect { name }) => {
            println!("{}", serde_json::to_string_pretty(&client.inspect_network(&name).await?)?)
        }
        Cmd::Network(NetworkCmd::Rm { name }) => {
            println!("network {} removed", client.remove_network(&name).await?.name)
        }
        Cmd::Network(NetworkCmd::RotateKey { name }) => {
            let n = client.rotate_network_key(&name).await?;
            println!("network {} key rotated: epoch {}", n.name, n.key_epoch.unwrap_or(0));
        }
        Cmd::Service(ServiceCmd::Create { name, networks, ports, replicas, constraints, command }) => {
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
        Cmd::Service(ServiceCmd::Ls { format }) => {
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
        Cmd::Service(ServiceCmd::Inspect { name }) => {
            println!("{}", serde_json::to_string_pretty(&client.inspect_service(&name).await?)?)
        }
        Cmd::Service(ServiceCmd::Scale { name, replicas }) => {
            let s = client.scale_service(&name, replicas).await?;
            println!("service {} scaled: {}/{} endpoint(s)", s.name, s.endpoints.len(), s.replicas);
        }
        Cmd::Policy(PolicyCmd::Test { .. }) => unreachable!("handled before connecting"),
        Cmd::Policy(PolicyCmd::Apply { file }) => {
            let (name, text) = read_policy(&file)?;
            // Parse locally first: the same errors, without a round trip.
            policy::Policy::parse(&name, &text)?;
            let applied = client.apply_policy(&name, &text).await?;
            println!("policy version {} in force ({} rule(s))", applied.version, applied.rules);
        }
        Cmd::Policy(PolicyCmd::Get { version }) => print!("{}", client.get_policy(version).await?.text),
        Cmd::Policy(PolicyCmd::History) => {
            let versions = client.policy_history().await?;
            print!(
                "{}",
                render(
                    &["VERSION", "APPLIED", "SOURCE", "FILE", "RULES", "IN FORCE"],
                    versions.iter().map(|p| vec![
                        p.version.to_string(),
                        when(p.applied_at),
                        p.source.clone(),
                        p.file.clone(),
                        p.rules.to_string(),
                        if p.current { "yes" } else { "" }.to_owned(),
                    ])
                )
            );
        }
        Cmd::Policy(PolicyCmd::Rollback { version }) => {
            let applied = client.rollback_policy(version).await?;
            println!("policy version {version} is back in force as version {}", applied.version);
        }
        Cmd::Policy(PolicyCmd::Explain { from, to, port, method, path, headers, .. }) => {
            let current = client.get_policy(None).await?;
            let p = policy::Policy::parse(&format!("policy version {}", current.version), &current.text)?;
            explain(&p, &from, &to, port, method.as_deref(), path.as_deref(), &headers)?;
        }
        Cmd::Service(ServiceCmd::Rm { name }) => {
            println!("service {} removed", client.remove_service(&name).await?.name)
        }
        Cmd::Lab(_) => unreachable!("lab commands return above"),
        Cmd::JoinToken { role, rotate, quiet } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let token = client.join_token(role, rotate).await?;
            if quiet {
                println!("{token}");
            } else {
                if rotate {
                    println!("The {role} join token was rotated; the previous one no longer works.");
                }
                println!("To add a {role}, run on it:");
                let control = bundle.managers.join(",");
                match role {
                    Role::Worker => println!(
                        "    meshd join --control {control} --token {token} --state-dir /var/lib/meshd"
                    ),
                    Role::Manager => println!(
                        "    mesh-control join --control {control} --token {token} --state-dir /var/lib/mesh-control \\\n        --advertise THIS_HOST:{}",
                        mesh_api::client::DEFAULT_CONTROL_PORT
                    ),
                }
            }
        }
    }
    Ok(())
}

/// `meshctl unlock`: gives the unlock key (from stdin) to each locked manager.
async fn unlock(bundle: &AdminBundle, managers: &[String]) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    if std::io::stdin().is_terminal() {
        eprint!("Unlock key: ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).context("cannot read the unlock key from stdin")?;
    let key = line.trim();
    anyhow::ensure!(!key.is_empty(), "no unlock key given on stdin");
    let targets = if managers.is_empty() { &bundle.managers } else { managers };
    let mut unlocked = 0;
    let mut failed = Vec::new();
    for addr in targets {
        match mesh_api::client::unlock(bundle, addr, key).await {
            Ok(()) => {
                println!("{addr}: unlocked");
                unlocked += 1;
            }
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => println!("{addr}: not locked"),
            Err(e) => {
                println!("{addr}: {e}");
                failed.push(addr.clone());
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "{} manager(s) not unlocked: {}", failed.len(), failed.join(", "));
    if unlocked == 0 {
        println!("no manager was locked");
    }
    Ok(())
}

fn when(t: Option<OffsetDateTime>) -> String {
    let Some(t) = t else { return "-".to_owned() };
    let now = OffsetDateTime::now_utc();
    let secs = (t - now).whole_seconds();
    let span = humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()));
    // Keep the two largest units: "23h 59m", not "23h 59m 58s".
    let short: Vec<_> = span.to_string().split(' ').take(2).map(str::to_owned).collect();
    if secs >= 0 { format!("in {}", short.join(" ")) } else { format!("{} ago", short.join(" ")) }
}

fn table(nodes: &[NodeView]) -> String {
    render(
        &["ID", "HOSTNAME", "ROLE", "STATE", "MANAGER", "LABELS", "CERT EXPIRES", "LAST SEEN"],
        nodes.iter().map(|n| {
            // A manager is up when it answers raft, whether or not its host runs meshd too.
            let manager_up = n
                .manager_status
                .as_deref()
                .is_some_and(|s| s.starts_with("leader") || s.starts_with("reachable"));
            let state = match n.state {
                NodeState::Removed => "removed",
                NodeState::Active if n.connected || manager_up => "ready",
                NodeState::Active => "down",
            };
            vec![
                n.id.to_string(),
                n.hostname.clone(),
                n.role.to_string(),
                state.to_owned(),
                n.manager_status.clone().unwrap_or_else(|| "-".into()),
                if n.labels.is_empty() { "-".to_owned() } else { n.labels.join(",") },
                when(n.cert_not_after),
                when(n.last_seen),
            ]
        }),
    )
}

/// Columns padded to their widest cell.
fn render(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
