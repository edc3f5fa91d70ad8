//! `meshctl`: the admin CLI of a mesh cluster.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use control::client::AdminClient;
use control::cluster::AdminBundle;
use control::proto::NodeView;
use control::tokens::Role;
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
    /// Remove a node: it is refused on every call from now on and its connections are cut.
    Rm { id: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let admin_dir = cli.admin.context(
        "no admin bundle: pass --admin DIR or set MESHCTL_ADMIN (mesh-control init writes it to STATE_DIR/admin)",
    )?;
    let bundle = AdminBundle::load(&admin_dir)
        .with_context(|| format!("cannot read the admin bundle in {}", admin_dir.display()))?;
    let mut client = AdminClient::connect(&bundle).await?;
    match cli.command {
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
        Cmd::JoinToken {
            role,
            rotate,
            quiet,
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let token = client.join_token(role, rotate).await?;
            if quiet {
                println!("{token}");
            } else {
                if rotate {
                    println!(
                        "The {role} join token was rotated; the previous one no longer works."
                    );
                }
                println!("To add a {role}, run on it:");
                match role {
                    Role::Worker => println!(
                        "    meshd join --control {} --token {token} --state-dir /var/lib/meshd",
                        bundle.control
                    ),
                    Role::Manager => println!(
                        "    mesh-control join --control {} --token {token} --state-dir /var/lib/mesh-control",
                        bundle.control
                    ),
                }
            }
        }
    }
    Ok(())
}

fn when(t: Option<OffsetDateTime>) -> String {
    let Some(t) = t else { return "-".to_owned() };
    let now = OffsetDateTime::now_utc();
    let secs = (t - now).whole_seconds();
    let span = humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs()));
    // Keep the two largest units: "23h 59m", not "23h 59m 58s".
    let short: Vec<_> = span
        .to_string()
        .split(' ')
        .take(2)
        .map(str::to_owned)
        .collect();
    if secs >= 0 {
        format!("in {}", short.join(" "))
    } else {
        format!("{} ago", short.join(" "))
    }
}

fn table(nodes: &[NodeView]) -> String {
    let header = [
        "ID",
        "HOSTNAME",
        "ROLE",
        "STATE",
        "CERT EXPIRES",
        "LAST SEEN",
    ];
    let rows: Vec<[String; 6]> = nodes
        .iter()
        .map(|n| {
            [
                n.id.to_string(),
                n.hostname.clone(),
                n.role.to_string(),
                format!("{:?}", n.state).to_lowercase(),
                when(n.cert_not_after),
                when(n.last_seen),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}
