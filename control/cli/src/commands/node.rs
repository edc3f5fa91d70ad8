//! `meshctl node`: the nodes of the cluster.

use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::model::NodeState;
use mesh_api::proto::NodeView;

use super::output::{Format, render, when};

#[derive(Subcommand)]
pub enum NodeCmd {
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
    /// endpoints move elsewhere and the keys of its networks rotate. A manager also leaves the
    /// managers' raft group (it stops); one that votes must be demoted first, or --force.
    Rm {
        id: String,
        /// Remove a manager that still votes (refused anyway if the others would lose their
        /// majority).
        #[arg(long)]
        force: bool,
    },
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

/// Runs `meshctl node ...` against the leader.
pub async fn run(cmd: NodeCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        NodeCmd::Promote { id } => {
            let node = client.promote_node(&id).await?;
            println!("{} votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        NodeCmd::Demote { id } => {
            let node = client.demote_node(&id).await?;
            println!("{} no longer votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        NodeCmd::Ls { format } => {
            let nodes = client.list_nodes().await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&nodes)?),
                Format::Table => print!("{}", table(&nodes)),
            }
        }
        NodeCmd::Inspect { id, format } => {
            let node = client.inspect_node(&id).await?;
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&node)?),
                Format::Table => print!("{}", table(std::slice::from_ref(&node))),
            }
        }
        NodeCmd::Rm { id, force } => {
            let node = client.remove_node(&id, force).await?;
            println!("{} removed", node.id);
        }
        NodeCmd::Update { id, label_add, label_rm } => {
            let node = client.update_node(&id, label_add, label_rm).await?;
            println!(
                "{} labels: {}",
                node.id,
                if node.labels.is_empty() { "-".to_owned() } else { node.labels.join(", ") }
            );
        }
    }
    Ok(())
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
