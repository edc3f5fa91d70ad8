//! `mesh-control`: the manager server of a mesh cluster.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use control::config::{self, ManagerOptions};
use control::manager::Manager;
use control::raft::seal::UnlockKey;
use control::serve;
use control::statedir::{self, ManagerConfig};
use mesh_api::metrics_http::{self, MetricsAddr};
use mesh_api::settings::Layered;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "mesh-control",
    version,
    about = "The manager server of a mesh cluster: CA, join, cluster state, admin API"
)]
struct Cli {
    /// The configuration file of `mesh-control run` (default: /etc/mesh/mesh-control.toml, when
    /// it exists): a key per flag of `mesh-control run` (`state-dir = "..."`, `key-rotation =
    /// "12h"`); flags and their environment variables win over it. `init` and `join` take the
    /// keys they share with it.
    #[arg(long, global = true, value_name = "FILE", env = "MESH_CONTROL_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

/// The configuration file read when none is named.
const DEFAULT_CONFIG: &str = "/etc/mesh/mesh-control.toml";

#[derive(Subcommand)]
enum Cmd {
    /// Create a new cluster: root CA, this manager's identity, join tokens and an admin bundle.
    Init {
        #[command(flatten)]
        place: Placement,
        /// Lifetime of node certificates (minimum 1h; default 24h), e.g. `24h`, `90m`, `7days`.
        #[arg(long, value_parser = parse_duration)]
        cert_expiry: Option<humantime::Duration>,
        /// Wrap the state's data key with an unlock key (`MESHKEY-1-...`, printed once): a
        /// restarted manager serves nothing until given it on its host (`meshctl unlock
        /// --state-dir DIR`).
        #[arg(long)]
        autolock: bool,
        /// Where to write the admin bundle for meshctl (made 0700) [default: ~/.config/mesh/admin].
        /// It is the cluster's admin credential: keep it off the managers' disks (the default is
        /// outside the state directory; move it to the admin's machine).
        #[arg(long)]
        admin_dir: Option<PathBuf>,
        /// After creating the cluster, serve it (as `run` would).
        #[arg(long)]
        run: bool,
        #[command(flatten)]
        external: ExternalCaArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Join an existing cluster as another manager (a voter of the replicated store), then serve.
    Join {
        /// The manager join token (`meshctl join-token manager`).
        #[arg(long, env = "MESH_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Any manager of the cluster (host:port); repeat or separate with commas for several.
        #[arg(long, required = true, value_delimiter = ',')]
        control: Vec<String>,
        #[command(flatten)]
        place: Placement,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Serve an existing cluster (same CA, tokens and nodes as before a restart).
    Run {
        #[arg(long)]
        state_dir: PathBuf,
        #[command(flatten)]
        serve: ServeArgs,
        /// Show the effective configuration (each value with where it came from: the command
        /// line, the environment, the file and line, or the default) and exit.
        #[arg(long)]
        print_config: bool,
    },
}

/// An external CA: the managers hold no CA key and forward the CSRs they checked to it.
#[derive(clap::Args)]
struct ExternalCaArgs {
    /// Sign every certificate with a CFSSL server (`cfssl serve`), e.g. `cfssl=http://10.0.0.5:8888`.
    /// Its profiles `node`, `workload` and `admin` sign each kind (usages `server auth` and
    /// `client auth`; an expiry no longer than the cluster asks: 24h for workloads), every
    /// profile with an `auth_key` (a signer that signs without one is refused). The root's
    /// subject O must be the cluster ID (25 characters of 0-9a-z). The managers check every
    /// certificate it answers against the root before using or handing it out.
    #[arg(
        long,
        value_name = "cfssl=URL",
        value_parser = control::ca::cfssl::parse_external_ca,
        requires_all = ["external_ca_key", "ca_cert"]
    )]
    external_ca: Option<String>,
    /// The file holding the CFSSL auth key (hex, as in its `auth_keys`): requests go to
    /// `/api/v1/cfssl/authsign`, HMAC-signed. Kept in the replicated state: use --autolock, so
    /// that a stolen disk does not give it away.
    #[arg(long, value_name = "FILE", requires = "external_ca")]
    external_ca_key: Option<PathBuf>,
    /// The external CA's root certificate, pinned: every certificate must chain to it.
    #[arg(long, value_name = "FILE", requires = "external_ca")]
    ca_cert: Option<PathBuf>,
}

impl ExternalCaArgs {
    fn choice(self) -> anyhow::Result<statedir::CaChoice> {
        let (Some(url), Some(key), Some(root)) = (self.external_ca, self.external_ca_key, self.ca_cert)
        else {
            return Ok(statedir::CaChoice::Own);
        };
        let read = |path: &PathBuf, what: &str| {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        let auth_key = read(&key, "external CA's auth key")?.trim().to_owned();
        control::ca::cfssl::parse_auth_key(&auth_key)
            .map_err(anyhow::Error::msg)
            .context("--external-ca-key")?;
        let root_pem = read(&root, "root certificate")?;
        Ok(statedir::CaChoice::External { url, auth_key, root_pem })
    }
}

/// Where a new manager keeps its state and listens.
#[derive(clap::Args)]
struct Placement {
    /// Directory for this manager's state; created with mode 0700. Must not hold a cluster.
    #[arg(long)]
    state_dir: PathBuf,
    /// Address the control API (and raft between managers) listens on.
    #[arg(long, default_value_t = config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Address nodes, admins and the other managers use to reach this one (default: --listen, or
    /// 127.0.0.1 with its port when --listen is 0.0.0.0).
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// The name `meshctl node ls` shows for this manager (default: the host's name).
    #[arg(long)]
    hostname: Option<String>,
}

impl Placement {
    /// The state directory and the new manager's config. A manager that would advertise a
    /// loopback address (nobody on another host could reach it) is refused unless told so with
    /// `--advertise`; one that joins, given no `--advertise`, advertises the address its host
    /// reaches the first of `managers` from.
    fn config(self, managers: &[String]) -> anyhow::Result<(PathBuf, ManagerConfig)> {
        let advertise = match (self.advertise, managers.first()) {
            (Some(a), _) => Some(a),
            (None, Some(manager)) if self.listen.ip().is_unspecified() => {
                let ip = route_to(manager).with_context(|| {
                    format!("cannot tell this host's address towards {manager}: give --advertise")
                })?;
                Some(SocketAddr::new(ip, self.listen.port()))
            }
            (None, _) => None,
        };
        let mut config = ManagerConfig::new(self.listen, advertise);
        anyhow::ensure!(
            self.advertise.is_some() || !config.advertise.ip().is_loopback(),
            "this manager would advertise {}, a loopback address that other hosts cannot reach: \
             give --advertise HOST:PORT (the address nodes and the other managers reach it at), or \
             --advertise {} to mean it",
            config.advertise,
            config.advertise
        );
        if let Some(name) = self.hostname {
            control::handlers::identity::check_hostname(&name).map_err(anyhow::Error::msg)?;
            config.hostname = name;
        }
        Ok((self.state_dir, config))
    }
}

/// The local address this host uses to reach `manager` (HOST:PORT): a route lookup, no packet
/// is sent.
fn route_to(manager: &str) -> anyhow::Result<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let target = manager.to_socket_addrs()?.next().context("the address resolves to nothing")?;
    let socket = std::net::UdpSocket::bind(SocketAddr::new(
        if target.is_ipv4() { [0, 0, 0, 0].into() } else { std::net::Ipv6Addr::UNSPECIFIED.into() },
        0,
    ))?;
    socket.connect(target)?;
    Ok(socket.local_addr()?.ip())
}

#[derive(clap::Args)]
struct ServeArgs {
    /// How often each encrypted network's key rotates (also at once when a node leaves it).
    #[arg(long, value_parser = parse_duration, default_value_t = config::DEFAULT_KEY_ROTATION.into())]
    key_rotation: humantime::Duration,
    /// How long a node may be without a session before its endpoints are placed elsewhere.
    #[arg(long, value_parser = parse_duration, default_value_t = config::DEFAULT_DOWN_AFTER.into())]
    down_after: humantime::Duration,
    /// Lifetime of workload certificates (renewed by meshd at half of it; at most 24h).
    #[arg(long, value_parser = parse_duration, default_value_t = config::DEFAULT_WORKLOAD_CERT_LIFETIME.into())]
    workload_cert_expiry: humantime::Duration,
    /// Where to serve Prometheus metrics (`GET /metrics`), or `off` [default: 127.0.0.1:9481,
    /// skipped with a warning when taken, as by another manager on the same host].
    #[arg(long, value_parser = metrics_http::parse_addr)]
    metrics: Option<MetricsAddr>,
}

impl ServeArgs {
    fn options(&self) -> anyhow::Result<ManagerOptions> {
        let options = ManagerOptions {
            key_rotation: self.key_rotation.into(),
            down_after: self.down_after.into(),
            workload_cert_lifetime: self.workload_cert_expiry.into(),
        };
        anyhow::ensure!(
            options.key_rotation >= config::MIN_KEY_ROTATION,
            "--key-rotation must be at least {}",
            humantime::format_duration(config::MIN_KEY_ROTATION)
        );
        let workload = config::MIN_WORKLOAD_CERT_LIFETIME..=mesh_api::pki::MAX_WORKLOAD_CERT_LIFETIME;
        anyhow::ensure!(
            workload.contains(&options.workload_cert_lifetime),
            "--workload-cert-expiry must be between {} and {}",
            humantime::format_duration(*workload.start()),
            humantime::format_duration(*workload.end())
        );
        Ok(options)
    }
}

fn parse_duration(s: &str) -> Result<humantime::Duration, String> {
    s.parse::<humantime::Duration>()
        .map_err(|e| format!("`{s}` is not a duration ({e}); examples: 24h, 90m, 7days"))
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("mesh-control: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let command = Cli::command();
    let (layered, args) = Layered::resolve(
        &command,
        "run",
        std::env::args_os().collect(),
        "MESH_CONTROL_CONFIG",
        std::path::Path::new(DEFAULT_CONFIG),
    )
    .map_err(anyhow::Error::msg)?;
    let matches = command.try_get_matches_from(args).unwrap_or_else(|e| layered.explain(e).exit());
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Cmd::Run { print_config: true, .. } => {
            let (name, sub) = matches.subcommand().expect("a subcommand");
            print!("{}", layered.render(Cli::command().find_subcommand(name).expect("run"), sub, &[]));
        }
        Cmd::Init { place, cert_expiry, autolock, admin_dir, run, external, serve: args } => {
            let ca_choice = external.choice()?;
            let (state_dir, config) = place.config(&[])?;
            let lifetime = cert_expiry.map_or(config::DEFAULT_CERT_LIFETIME, Into::into);
            let admin_dir = match admin_dir {
                Some(dir) => dir,
                None => {
                    let home = std::env::var_os("HOME")
                        .context("no HOME to put the admin bundle in: give --admin-dir")?;
                    PathBuf::from(home).join(".config/mesh/admin")
                }
            };
            anyhow::ensure!(
                !admin_dir.join("admin.key").exists(),
                "{} already holds an admin bundle (of another cluster?): give --admin-dir",
                admin_dir.display()
            );
            let external = match &ca_choice {
                statedir::CaChoice::External { url, .. } => Some(url.clone()),
                statedir::CaChoice::Own => None,
            };
            let created =
                statedir::init_with_admin_dir(&state_dir, config, lifetime, autolock, &admin_dir, ca_choice)
                    .await?;
            println!("Cluster {} created in {}.", created.cluster_id, state_dir.display());
            if let Some(url) = external {
                println!(
                    "Root CA: external, signing at {url}; digest {} (the join tokens pin it). No manager holds its key.",
                    created.worker_token.ca_digest()
                );
            }
            println!("Manager node ID: {}", created.manager_id);
            println!(
                "Admin bundle: {} (export MESHCTL_ADMIN={})",
                created.admin_dir.display(),
                created.admin_dir.display()
            );
            println!();
            println!("To add a worker, run on it:");
            println!(
                "    meshd join --control {} --token {} --state-dir /var/lib/meshd",
                created.config.advertise, created.worker_token
            );
            println!();
            println!("To add a manager, run on it:");
            println!(
                "    mesh-control join --control {} --token {} --state-dir /var/lib/mesh-control",
                created.config.advertise, created.manager_token
            );
            if let Some(key) = &created.unlock_key {
                println!();
                println!("Autolock is on. The unlock key, shown only this once (keep it safe):");
                println!("    {key}");
                println!("A restarted manager serves nothing until given it, on its host:");
                println!("    meshctl unlock --state-dir {}", state_dir.display());
            }
            if run {
                serve(state_dir, args.options()?, args.metrics, created.unlock_key, None).await?;
            }
        }
        Cmd::Join { token, control, place, serve: args } => {
            let options = args.options()?;
            let (state_dir, config) = place.config(&control)?;
            let joined = statedir::join(&state_dir, config, &control, &token).await?;
            println!(
                "Joined cluster {} as manager {} (raft ID {}); state in {}.",
                joined.cluster_id,
                joined.node_id,
                joined.raft_id,
                state_dir.display()
            );
            serve(state_dir, options, args.metrics, None, joined.autolock.then_some(&joined)).await?;
        }
        Cmd::Run { state_dir, serve: args, print_config: _ } => {
            serve(state_dir, args.options()?, args.metrics, None, None).await?
        }
    }
    Ok(())
}

/// Serves the manager in `state_dir`; a locked one first waits for `meshctl unlock` on this host
/// (unless this process already holds the key: `init --autolock --run`).
async fn serve(
    state_dir: PathBuf,
    options: ManagerOptions,
    metrics: Option<MetricsAddr>,
    known: Option<UnlockKey>,
    joined: Option<&statedir::JoinedManager>,
) -> anyhow::Result<()> {
    // Caught from here on: a stop while it starts is kept for when it waits for one.
    let mut stop = mesh_api::notify::Stop::catch().context("catching SIGTERM")?;
    let listen = statedir::read_config(&state_dir)?.listen;
    let bind = || async {
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))
    };
    let unlock = if known.is_some() {
        known
    } else if joined.is_none() && statedir::is_locked(&state_dir)? {
        warn!(
            socket = %statedir::ManagerDir::new(&state_dir).unlock_socket().display(),
            "this manager is locked (autolock): it serves nothing until unlocked on this host: meshctl unlock --state-dir {}",
            state_dir.display()
        );
        mesh_api::notify::tell(&format!(
            "STATUS=locked: waiting for `meshctl unlock --state-dir {}` on this host",
            state_dir.display()
        ));
        let key = tokio::select! {
            key = serve::serve_locked(&state_dir) => key?,
            _ = stop.wait() => return Ok(()),
        };
        info!("unlocked");
        Some(key)
    } else {
        None
    };
    let opened = match joined {
        Some(joined) => statedir::open_joined(&state_dir, joined).await?,
        None => statedir::open(&state_dir, unlock.as_ref()).await?,
    };
    let config = opened.config.clone();
    let (cluster_id, lifetime, nodes) =
        opened.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime(), s.nodes.len()));
    let listener = bind().await?;
    info!(
        cluster = %cluster_id,
        listen = %config.listen,
        advertise = %config.advertise,
        cert_lifetime = %humantime::format_duration(lifetime),
        nodes,
        key_rotation = %humantime::format_duration(options.key_rotation),
        down_after = %humantime::format_duration(options.down_after),
        state_dir = %state_dir.display(),
        "serving the control API"
    );
    let manager = Manager::new(opened, options)?;
    let metrics = match metrics {
        Some(MetricsAddr(None)) => None,
        Some(MetricsAddr(Some(address))) => Some(metrics_http::bind(address).await?),
        None => metrics_http::bind(config::DEFAULT_METRICS_ADDR)
            .await
            .inspect_err(|e| warn!(error = %e, "serving no metrics (give --metrics ADDR, or off)"))
            .ok(),
    };
    if let Some(listener) = metrics {
        let m = manager.clone();
        let r = manager.clone();
        let ready: metrics_http::Readiness = std::sync::Arc::new(move || {
            let l = r.store().leadership();
            match l.leader {
                Some(_) => Ok(()),
                None => Err("no leader known: the managers have no majority".into()),
            }
        });
        tokio::spawn(metrics_http::serve(listener, std::sync::Arc::new(move || m.metrics_text()), ready));
    }
    let shutdown = async move {
        stop.wait().await;
        info!("shutting down");
    };
    mesh_api::notify::tell(&format!("READY=1\nSTATUS=serving cluster {cluster_id} on {}", config.listen));
    let stopped = serve::serve(manager.clone(), listener, shutdown, unlock.as_ref()).await;
    mesh_api::notify::tell("STOPPING=1");
    let stopped = stopped?;
    manager.store().shutdown().await;
    anyhow::ensure!(
        stopped != serve::Stopped::Removed,
        "this manager was removed from the cluster (meshctl node rm); {} serves no more",
        state_dir.display()
    );
    Ok(())
}
