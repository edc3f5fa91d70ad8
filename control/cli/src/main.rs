//! `meshctl`: the admin CLI of a mesh cluster.

mod commands;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use commands::cluster::{self, ClusterCmd};
use commands::network::{self, NetworkCmd};
use commands::node::{self, NodeCmd};
use commands::policy::{self, PolicyCmd};
use commands::secret::{self, SecretCmd};
use commands::service::{self, ServiceCmd};
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use meshctl::lab;
use nix::sys::signal::{SigHandler, Signal, signal};

#[derive(Parser)]
#[command(name = "meshctl", version, about = "Administer a mesh cluster")]
struct Cli {
    /// The admin bundle directory made by `mesh-control init` (DIR/admin).
    #[arg(long, env = "MESHCTL_ADMIN", global = true)]
    admin: Option<PathBuf>,
    /// The operator's spec-signing key (`meshctl spec-key create`): `service create` and
    /// `update` sign what they ask to run with it, for nodes that pinned its public key, and
    /// `secret create` records the digest of each secret beside it (FILE.secrets).
    #[arg(long, env = "MESHCTL_SPEC_KEY", global = true, value_name = "FILE")]
    spec_key: Option<PathBuf>,
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
    /// Secrets that services' workloads read at /run/secrets/NAME.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// The service-to-service ACL policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// A local cluster in network namespaces, as root: up, exec, status, down.
    #[command(subcommand)]
    Lab(LabCmd),
    /// Cluster-wide settings, autolock and its unlock key, admin credentials, the root CA.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Unlock a manager that restarted locked (autolock), on its host: the unlock key is read
    /// from stdin (not echoed on a terminal). No admin bundle is needed: whoever can open the
    /// manager's state directory and knows the key may unlock it.
    Unlock {
        /// The locked manager's state directory (its unlock socket is there).
        #[arg(long)]
        state_dir: std::path::PathBuf,
    },
    /// The operator's spec-signing key: nodes that pin its public key at join (`meshd join
    /// --spec-key`) run only the commands it signed, whatever a manager sends them.
    #[command(subcommand)]
    SpecKey(SpecKeyCmd),
    /// What is wrong with the cluster, each problem with the command that fixes it: managers
    /// and quorum, nodes down, certificates close to expiry, endpoints not running, updates
    /// paused, key rotations overdue, policy rules that never match. Exit status 1 when
    /// something is wrong.
    Check,
    /// This meshctl's version and the leading manager's.
    Version,
    /// Print the shell completion script for bash, zsh or fish, e.g.
    /// `meshctl completion bash > /etc/bash_completion.d/meshctl`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages (meshctl.1 and one per subcommand) into DIR.
    Man {
        #[arg(long)]
        dir: PathBuf,
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
enum SpecKeyCmd {
    /// Make a key pair in DIR: spec-signing.key (0600; keep it with the operator, never on a
    /// manager, and not in an admin bundle that lives on one) and spec-signing.pub (what nodes
    /// pin).
    Create {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Print the public key of the key pair in DIR (to pin with `meshd join --spec-key`).
    Show {
        #[arg(long)]
        dir: PathBuf,
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
        Cmd::Unlock { state_dir } => return cluster::unlock(state_dir).await,
        Cmd::SpecKey(cmd) => return spec_key(cmd),
        Cmd::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "meshctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man { dir } => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages to {}", dir.display()))?;
            println!("man pages written to {}", dir.display());
            return Ok(());
        }
        Cmd::Policy(PolicyCmd::Test { file }) => return policy::policy_test(file),
        Cmd::Policy(PolicyCmd::Explain {
            from,
            to,
            port,
            method,
            path,
            headers,
            names,
            file: Some(file),
        }) => {
            let (name, text) = policy::read_policy(file)?;
            let p = ::policy::Policy::parse(&name, &text)?;
            return policy::explain(&p, from, to, *port, method.as_deref(), path.as_deref(), headers, names);
        }
        _ => {}
    }
    let admin_dir = cli.admin.context(
        "no admin bundle: pass --admin DIR or set MESHCTL_ADMIN (mesh-control init writes it to --admin-dir, by default ~/.config/mesh/admin)",
    )?;
    let mut bundle = AdminBundle::load(&admin_dir)
        .with_context(|| format!("cannot read the admin bundle in {}", admin_dir.display()))?;
    let cluster = mesh_api::pki::CertInfo::from_pem(&bundle.identity.cert_pem)
        .context("the admin certificate is unreadable")?
        .organization;
    let signer =
        cli.spec_key.as_deref().map(|path| commands::signing::Signer::load(path, &cluster)).transpose()?;
    let mut client = AdminClient::connect(&bundle).await?;
    // A bundle that cannot be written (read-only) still works with the managers it names.
    let _ = bundle.remember_managers(&admin_dir, client.managers(), client.manager_ids());
    match cli.command {
        Cmd::Node(cmd) => node::run(cmd, &mut client).await,
        Cmd::Network(cmd) => network::run(cmd, &mut client).await,
        Cmd::Service(cmd) => service::run(cmd, &mut client, signer.as_ref()).await,
        Cmd::Secret(cmd) => secret::run(cmd, &mut client, signer.as_ref()).await,
        Cmd::Policy(cmd) => policy::run(cmd, &mut client).await,
        Cmd::Cluster(cmd @ ClusterCmd::Ca { .. }) => cluster::ca(cmd, &mut client, &admin_dir).await,
        Cmd::Cluster(cmd) => cluster::run(cmd, &mut client).await,
        Cmd::Check => commands::check::run(&mut client).await,
        Cmd::Version => {
            let leader = client.inspect_cluster().await?;
            println!("meshctl       {}", env!("CARGO_PKG_VERSION"));
            let version =
                if leader.version.is_empty() { "unknown (it does not say)" } else { &leader.version };
            println!("mesh-control  {version} (the leader, cluster {})", leader.id);
            Ok(())
        }
        Cmd::JoinToken { role, rotate, quiet } => {
            cluster::join_token(&mut client, &bundle, &role, rotate, quiet).await
        }
        Cmd::Unlock { .. } | Cmd::Lab(_) | Cmd::SpecKey(_) | Cmd::Completion { .. } | Cmd::Man { .. } => {
            unreachable!("these return above")
        }
    }
}

/// `meshctl spec-key create|show`, in DIR or the admin bundle.
fn spec_key(cmd: &SpecKeyCmd) -> anyhow::Result<()> {
    let (SpecKeyCmd::Create { dir } | SpecKeyCmd::Show { dir }) = cmd;
    match cmd {
        SpecKeyCmd::Create { .. } => {
            let public = mesh_api::specs::SigningKey::create(dir)?;
            println!("{public}");
            eprintln!(
                "Spec-signing key made: {} (keep it with the operator; never on a manager) and {}.",
                dir.join(mesh_api::specs::PRIVATE_FILE).display(),
                dir.join(mesh_api::specs::PUBLIC_FILE).display()
            );
            eprintln!("Pin it on each node as it joins: meshd join ... --spec-key '{public}'");
        }
        SpecKeyCmd::Show { .. } => {
            let key = mesh_api::specs::SigningKey::load(&dir.join(mesh_api::specs::PRIVATE_FILE))?;
            println!("{}", key.public());
        }
    }
    Ok(())
}
