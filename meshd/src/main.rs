//! `meshd`: the per-host agent of a mesh cluster.

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use mesh_api::metrics_http::{self, MetricsAddr};
use mesh_api::settings::Layered;
use meshd::config::{self, AgentConfig};
use meshd::dns::Visibility;
use meshd::session::SessionConfig;
use meshd::status::Renewal;
use meshd::{agent, identity, status};

#[derive(Parser)]
#[command(name = "meshd", version, about = "The per-host agent of a mesh cluster")]
struct Cli {
    /// The configuration file of `meshd run` (default: /etc/mesh/meshd.toml, when it exists): a
    /// key per flag of `meshd run` (`state-dir = "..."`); flags and their environment variables
    /// win over it. Other commands take the keys they share with it (`state-dir`).
    #[arg(long, global = true, value_name = "FILE", env = "MESHD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join a cluster: pin its CA by the token's digest, generate a key here, get a certificate.
    Join {
        /// The control address (host:port), as printed by `mesh-control init`.
        #[arg(long)]
        control: String,
        /// A join token `MESHTKN-1-...` (`meshctl join-token worker`).
        #[arg(long, env = "MESHD_JOIN_TOKEN")]
        token: String,
        /// Where the node's identity is kept (created with mode 0700).
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The name this node reports (default: the host's name).
        #[arg(long)]
        hostname: Option<String>,
        /// Pin the operator's spec-signing public key (`MESHSPEC-ED25519-1 ...`, or the file
        /// `meshctl spec-key create` wrote): the node then runs only commands whose spec that
        /// key signed. Only at join: no manager can change it later.
        #[arg(long, value_name = "KEY|FILE")]
        spec_key: Option<String>,
    },
    /// Run the agent: keep the node's certificate renewed and hold the session with control.
    Run {
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where this node receives overlay traffic (UDP) and mesh connections (TCP, same port):
        /// IP or IP:PORT (default: this host's address towards control, port 4800).
        #[arg(long)]
        underlay: Option<String>,
        /// Prefix of workload namespaces (`PREFIX-SERVICE-SLOT`); unique per meshd on a machine.
        #[arg(long, default_value = config::DEFAULT_NETNS_PREFIX)]
        netns_prefix: String,
        /// Hold the session only: no namespaces, devices or overlay socket (no root needed).
        #[arg(long)]
        no_dataplane: bool,
        /// Which services a workload can resolve: all on its networks, or only those the policy
        /// in force may let it reach.
        #[arg(long, value_enum, default_value_t = config::DEFAULT_DNS_VISIBILITY)]
        dns_visibility: Visibility,
        /// Where to serve Prometheus metrics (`GET /metrics`); `off` for nowhere.
        #[arg(long, default_value = config::DEFAULT_METRICS, value_parser = metrics_http::parse_addr)]
        metrics: MetricsAddr,
        /// The address published ports (`meshctl service create --publish`) listen on in this
        /// host's namespace (all of its IPv4 addresses by default).
        #[arg(long, default_value = config::DEFAULT_PUBLISH_ADDRESS)]
        publish_address: std::net::Ipv4Addr,
        /// Which names outside the mesh a workload's DNS looks up: `policy`, only those an
        /// egress rule of its service could let it reach (any, if one names a network; the
        /// others are REFUSED); `always`, every name.
        #[arg(long, value_enum, default_value_t = meshd::dns::DnsUpstream::Policy)]
        dns_upstream: meshd::dns::DnsUpstream,
        /// A name server (IP, port 53) for names outside the mesh: workloads' lookups and the
        /// names of egress rules (repeat for several; default: the host's /etc/resolv.conf).
        #[arg(long = "resolver", value_name = "IP")]
        resolvers: Vec<std::net::IpAddr>,
        /// Show the effective configuration (each value with where it came from: the command
        /// line, the environment, the file and line, or the default) and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Check this host's prerequisites for `meshd run` (root, tun, nftables, network
    /// namespaces, cgroups, a joined state directory with a valid certificate, a manager
    /// reachable), each failed one with its fix; exit status 1 when one fails.
    Check {
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Show what the running agent holds: networks, key epochs (never key bytes), endpoints, peers.
    Status {
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ping a service (`SERVICE` or `SERVICE.NETWORK`: each of its endpoints, at most 8) or an
    /// overlay address through the overlay, from a workload of this node on the same network,
    /// showing each path (peer node, network, transport and key epoch) and the round trip.
    Ping {
        target: String,
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Renew the node's certificate now (a fresh key pair, same node ID); a running agent does it,
    /// so that it serves the new certificate at once.
    Renew {
        #[arg(long, default_value = config::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

fn main() {
    // The sandbox helper (`meshd sandbox-exec`, started by meshd itself for each workload, its
    // plan on stdin): before any thread exists, for it changes namespaces and users of the whole
    // process.
    if std::env::args_os().nth(1).is_some_and(|a| a == meshd::sandbox::HELPER) {
        meshd::sandbox::exec();
    }
    tokio::runtime::Runtime::new().expect("a Tokio runtime").block_on(run());
}

async fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::command();
    let resolved = Layered::resolve(
        &cli,
        "run",
        std::env::args_os().collect(),
        "MESHD_CONFIG",
        std::path::Path::new(config::DEFAULT_CONFIG),
    );
    let (layered, args) = resolved.unwrap_or_else(|e| {
        eprintln!("meshd: {e}");
        std::process::exit(2)
    });
    let matches = cli.try_get_matches_from(args).unwrap_or_else(|e| layered.explain(e).exit());
    let parsed = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match parsed.command {
        Cmd::Run { print_config: true, .. } => {
            let (name, sub) = matches.subcommand().expect("a subcommand");
            print!("{}", layered.render(Cli::command().find_subcommand(name).expect("run"), sub, &[]));
            Ok(())
        }
        Cmd::Join { control, token, state_dir, hostname, spec_key } => {
            let hostname = hostname.unwrap_or_else(mesh_api::join::hostname);
            let join = async {
                if let Some(key) = spec_key {
                    let key = mesh_api::specs::PinnedKey::read(&key)?;
                    identity::NodeDir::new(&state_dir).pin_spec_key(&key)?;
                    eprintln!("Pinned the spec-signing key {key}: only commands it signed run here.");
                }
                let id = identity::join(&control, &token, &state_dir, &hostname).await?;
                println!("{id}");
                eprintln!("Joined as node {id}; identity stored in {}.", state_dir.display());
                anyhow::Ok(())
            };
            join.await
        }
        Cmd::Run {
            state_dir,
            underlay,
            netns_prefix,
            no_dataplane,
            dns_visibility,
            metrics,
            publish_address,
            dns_upstream,
            resolvers,
            print_config: _,
        } => match config::underlay_address(underlay.as_deref(), &state_dir) {
            Ok(underlay) => agent::run(AgentConfig {
                session: SessionConfig { state_dir, underlay, boot: 0, wireguard: None },
                netns_prefix,
                dataplane: !no_dataplane,
                dns_visibility,
                metrics: metrics.0,
                publish_address,
                dns_upstream,
                resolvers,
            })
            .await
            .map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Cmd::Check { state_dir } => meshd::check::run(&state_dir).await,
        Cmd::Status { state_dir, json } => {
            status::query(&state_dir).await.map_err(anyhow::Error::msg).map(|s| {
                if json {
                    println!("{}", serde_json::to_string_pretty(&s).expect("status serializes"));
                } else {
                    print!("{}", s.render());
                }
            })
        }
        Cmd::Ping { target, state_dir, json } => match status::ask_ping(&state_dir, &target).await {
            Ok(echoes) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&echoes).expect("echoes serialize"));
                } else {
                    print!("{}", meshd::ping::render(&echoes));
                }
                if echoes.iter().all(|e| e.received > 0) {
                    Ok(())
                } else {
                    Err(anyhow::anyhow!("some paths did not answer"))
                }
            }
            Err(e) => Err(anyhow::anyhow!(e)),
        },
        Cmd::Renew { state_dir } => match status::ask_renewal(&state_dir).await {
            Ok(Some(Renewal::Renewed { node, not_after })) => {
                println!("{node} renewed; certificate valid until {not_after}");
                Ok(())
            }
            Ok(Some(Renewal::Failed(why))) => Err(anyhow::anyhow!(why)),
            Ok(None) => identity::renew(&state_dir)
                .await
                .map(|node| {
                    println!("{} renewed; certificate valid until {}", node.id, node.info.not_after);
                })
                .map_err(anyhow::Error::from),
            Err(e) => Err(anyhow::anyhow!(e)),
        },
    };
    if let Err(e) = result {
        eprintln!("meshd: {e:#}");
        std::process::exit(1);
    }
}
