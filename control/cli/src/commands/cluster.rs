//! `meshctl cluster`, `meshctl unlock` and `meshctl join-token`: cluster-wide settings, unlocking
//! managers (autolock) and the join tokens.

use anyhow::Context;
use clap::Subcommand;
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use mesh_api::tokens::Role;

#[derive(Subcommand)]
pub enum ClusterCmd {
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

/// Runs `meshctl cluster ...` against the leader.
pub async fn run(cmd: ClusterCmd, client: &mut AdminClient) -> anyhow::Result<()> {
    match cmd {
        ClusterCmd::Update { autolock } => {
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
        ClusterCmd::UnlockKey { rotate } => {
            let key = client.unlock_key(rotate).await?;
            if rotate {
                println!("The unlock key was rotated; the previous one no longer unlocks any manager.");
            }
            println!("{key}");
        }
    }
    Ok(())
}

/// `meshctl unlock`: gives the unlock key (from stdin) to each locked manager.
pub async fn unlock(bundle: &AdminBundle, managers: &[String]) -> anyhow::Result<()> {
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

/// `meshctl join-token ROLE`: shows (or rotates) the token and how to use it on another host.
pub async fn join_token(
    client: &mut AdminClient,
    bundle: &AdminBundle,
    role: &str,
    rotate: bool,
    quiet: bool,
) -> anyhow::Result<()> {
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
            Role::Worker => {
                println!("    meshd join --control {control} --token {token} --state-dir /var/lib/meshd")
            }
            Role::Manager => println!(
                "    mesh-control join --control {control} --token {token} --state-dir /var/lib/mesh-control \\\n        --advertise THIS_HOST:{}",
                mesh_api::client::DEFAULT_CONTROL_PORT
            ),
        }
    }
    Ok(())
}
