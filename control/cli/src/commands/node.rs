//! `meshctl node`: the nodes of the cluster.

use clap::Subcommand;
use mesh_api::client::AdminClient;
use mesh_api::model::NodeState;
use mesh_api::proto::NodeView;

use super::output::{Format, data, render, when};

#[derive(Subcommand)]
pub enum NodeCmd {
    /// List nodes.
    Ls {
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Only the node IDs, one per line.
        #[arg(short, long)]
        quiet: bool,
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
    let cmd = match cmd {
        NodeCmd::Inspect { id, format } => NodeCmd::Inspect { id: resolve(client, &id).await?, format },
        NodeCmd::Rm { id, force } => NodeCmd::Rm { id: resolve(client, &id).await?, force },
        NodeCmd::Promote { id } => NodeCmd::Promote { id: resolve(client, &id).await? },
        NodeCmd::Demote { id } => NodeCmd::Demote { id: resolve(client, &id).await? },
        NodeCmd::Update { id, label_add, label_rm } => {
            NodeCmd::Update { id: resolve(client, &id).await?, label_add, label_rm }
        }
        other => other,
    };
    match cmd {
        NodeCmd::Promote { id } => {
            let node = client.promote_node(&id).await?;
            println!("{} votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        NodeCmd::Demote { id } => {
            let node = client.demote_node(&id).await?;
            println!("{} no longer votes: {}", node.id, node.manager_status.as_deref().unwrap_or("-"));
        }
        NodeCmd::Ls { format, quiet } => {
            let nodes = client.list_nodes().await?;
            if quiet {
                nodes.iter().for_each(|n| println!("{}", n.id));
                return Ok(());
            }
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &nodes)?),
                Format::Table => print!("{}", table(&nodes)),
            }
        }
        NodeCmd::Inspect { id, format } => {
            let node = client.inspect_node(&id).await?;
            match format {
                Format::Json | Format::Yaml => print!("{}", data(format, &node)?),
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

/// The node ID `given` names: an ID, a host name, or the start of exactly one node's ID (as
/// docker takes them).
async fn resolve(client: &mut AdminClient, given: &str) -> anyhow::Result<String> {
    let nodes = client.list_nodes().await?;
    let known: Vec<(String, String)> = nodes.iter().map(|n| (n.id.to_string(), n.hostname.clone())).collect();
    pick(&known, given)
}

/// [`resolve`] among (ID, host name) pairs; what names none is left for control to refuse.
fn pick(nodes: &[(String, String)], given: &str) -> anyhow::Result<String> {
    if given.is_empty() || nodes.iter().any(|(id, _)| id == given) {
        return Ok(given.to_owned());
    }
    let ids =
        |found: &[&(String, String)]| found.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>().join(", ");
    let named: Vec<&(String, String)> = nodes.iter().filter(|(_, host)| host == given).collect();
    match named.as_slice() {
        [one] => return Ok(one.0.clone()),
        [] => {}
        several => {
            anyhow::bail!("{} nodes are named `{given}`: give the ID ({})", several.len(), ids(several))
        }
    }
    let started: Vec<&(String, String)> = nodes.iter().filter(|(id, _)| id.starts_with(given)).collect();
    match started.as_slice() {
        [one] => Ok(one.0.clone()),
        [] => Ok(given.to_owned()),
        several => anyhow::bail!("`{given}` starts several node IDs ({}): give more of it", ids(several)),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_its_id_its_host_name_or_a_unique_start_of_its_id() {
        let nodes: Vec<(String, String)> =
            [("abc123", "h1"), ("abd456", "h2"), ("xyz789", "h2"), ("h1x", "h3")]
                .iter()
                .map(|(i, h)| (i.to_string(), h.to_string()))
                .collect();
        assert_eq!(pick(&nodes, "abc123").unwrap(), "abc123");
        assert_eq!(pick(&nodes, "abc").unwrap(), "abc123");
        assert_eq!(pick(&nodes, "xy").unwrap(), "xyz789");
        assert_eq!(pick(&nodes, "h1").unwrap(), "abc123", "a host name before an ID's start");
        assert_eq!(pick(&nodes, "h3").unwrap(), "h1x");
        let e = pick(&nodes, "ab").unwrap_err().to_string();
        assert!(e.contains("abc123") && e.contains("abd456") && e.contains("more of it"), "{e}");
        let e = pick(&nodes, "h2").unwrap_err().to_string();
        assert!(e.contains("2 nodes are named `h2`"), "{e}");
        assert_eq!(pick(&nodes, "nope").unwrap(), "nope", "unknown: control says so");
        assert_eq!(pick(&nodes, "").unwrap(), "");
    }
}
