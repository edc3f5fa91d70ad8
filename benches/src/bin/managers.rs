//! Several managers: how long the cluster is without a leader when the leader dies, how long
//! node sessions take to be back, and how many admin changes per second are committed with one
//! manager and with three (each change one raft entry, replicated to a majority before it is
//! answered).
//!
//! Runs real `mesh-control` processes on loopback and N real node sessions (meshd's session
//! code, gRPC over mTLS) in this process. Each round SIGKILLs the leader, times until another
//! manager answers as leader and until every session is open again, then restarts the killed one.
//!
//!     cargo build --release -p control
//!     cargo run --release -p benches --bin managers -- --nodes 50 --rounds 5 --writes 500

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use benches::ManagerProcess;
use clap::Parser;
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use mesh_api::tokens::Role;
use meshd::session::{SessionConfig, SessionEvent};

#[derive(Parser)]
#[command(about = "Manager failover time and admin write throughput, one manager against three")]
struct Args {
    /// Node sessions held during failovers.
    #[arg(long, default_value_t = 50)]
    nodes: usize,
    /// Leader failovers timed.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Admin changes per write measurement.
    #[arg(long, default_value_t = 500)]
    writes: usize,
    /// Concurrent admin clients for the concurrent write measurement.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value = "target/release/mesh-control")]
    mesh_control: PathBuf,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Writes {
    managers: usize,
    sequential_per_s: f64,
    concurrent_per_s: f64,
}

#[derive(serde::Serialize)]
struct Results {
    nodes: usize,
    elect_ms: Vec<f64>,
    sessions_back_ms: Vec<f64>,
    writes: Vec<Writes>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    rlimit::increase_nofile_limit(1 << 16)?;
    let mut writes = Vec::new();

    eprintln!("== one manager: admin writes");
    let dir = tempfile::tempdir()?;
    let single = ManagerProcess::init(&args.mesh_control, dir.path()).await?;
    writes.push(measure_writes(&args, &single.bundle()?, 1).await?);
    drop(single);

    eprintln!("== three managers");
    let dir = tempfile::tempdir()?;
    let first = ManagerProcess::init(&args.mesh_control, dir.path()).await?;
    let mut managers = vec![first];
    for n in 2..=3 {
        let m = ManagerProcess::join(&managers[0], dir.path(), n).await?;
        managers.push(m);
    }
    let mut bundle = managers[0].bundle()?;
    bundle.managers = managers.iter().map(|m| m.listen.clone()).collect();
    wait_for_voters(&bundle, 3).await?;
    writes.push(measure_writes(&args, &bundle, 3).await?);

    eprintln!("   joining and opening {} node sessions", args.nodes);
    let connected = open_sessions(&bundle, args.nodes, dir.path()).await?;
    wait(|| connected.load(Ordering::Relaxed) >= args.nodes, "every session to open").await?;

    let (mut elect, mut back) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let leader = AdminClient::connect(&bundle).await?.addr().to_owned();
        let victim = managers.iter().position(|m| m.listen == leader).expect("the leader is one of ours");
        let opened_before = connected.load(Ordering::Relaxed);
        let start = Instant::now();
        managers[victim].kill();
        // A new leader answers.
        loop {
            if let Ok(c) = AdminClient::connect(&bundle).await
                && c.addr() != leader
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let elected = start.elapsed();
        wait(|| connected.load(Ordering::Relaxed) >= opened_before + args.nodes, "sessions to reopen")
            .await?;
        let resumed = start.elapsed();
        eprintln!(
            "   round {round}: leader after {elected:?}, all {} sessions back after {resumed:?}",
            args.nodes
        );
        elect.push(elected.as_secs_f64() * 1000.0);
        back.push(resumed.as_secs_f64() * 1000.0);
        managers[victim].restart()?;
        wait_for_voters(&bundle, 3).await?;
    }

    println!("\n| managers | admin writes/s, 1 client | {} clients |", args.clients);
    println!("|---|---|---|");
    for w in &writes {
        println!("| {} | {:.0} | {:.0} |", w.managers, w.sequential_per_s, w.concurrent_per_s);
    }
    println!(
        "\nleader killed ({} rounds, {} sessions): new leader answers after {:.0} ms (median; max {:.0}), \
         every session back after {:.0} ms (median; max {:.0})",
        args.rounds,
        args.nodes,
        median(&elect),
        elect.iter().cloned().fold(0.0, f64::max),
        median(&back),
        back.iter().cloned().fold(0.0, f64::max),
    );
    let results = Results { nodes: args.nodes, elect_ms: elect, sessions_back_ms: back, writes };
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

/// Admin changes (a label set on a node, alternately added and removed), one client after the
/// other, then from several clients at once.
async fn measure_writes(args: &Args, bundle: &AdminBundle, managers: usize) -> anyhow::Result<Writes> {
    let mut admin = AdminClient::connect(bundle).await?;
    let node = admin.list_nodes().await?[0].id.to_string();
    let start = Instant::now();
    for i in 0..args.writes {
        admin.update_node(&node, vec![format!("bench={i}")], vec![]).await?;
    }
    let sequential = args.writes as f64 / start.elapsed().as_secs_f64();
    let per_client = args.writes / args.clients;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let mut admin = AdminClient::connect(bundle).await?;
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                admin.update_node(&node, vec![format!("bench{c}={i}")], vec![]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let concurrent = (per_client * args.clients) as f64 / start.elapsed().as_secs_f64();
    eprintln!(
        "   {managers} manager(s): {sequential:.0} writes/s from 1 client, {concurrent:.0} from {}",
        args.clients
    );
    Ok(Writes { managers, sequential_per_s: sequential, concurrent_per_s: concurrent })
}

async fn wait_for_voters(bundle: &AdminBundle, voters: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut admin) = AdminClient::connect(bundle).await
            && let Ok(nodes) = admin.list_nodes().await
        {
            let up = nodes
                .iter()
                .filter(|n| n.manager_status.as_deref().is_some_and(|s| s == "leader" || s == "reachable"))
                .count();
            if up == voters {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the managers did not come up");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Joins `n` nodes and runs their sessions; counts every session opened.
async fn open_sessions(
    bundle: &AdminBundle,
    n: usize,
    dir: &std::path::Path,
) -> anyhow::Result<Arc<AtomicUsize>> {
    let mut admin = AdminClient::connect(bundle).await?;
    let token = admin.join_token(Role::Worker, false).await?;
    let connected = Arc::new(AtomicUsize::new(0));
    for i in 0..n {
        let state_dir = dir.join(format!("n{i}"));
        meshd::identity::join(&bundle.managers.join(","), &token, &state_dir, &format!("sim{i}")).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let underlay = std::net::SocketAddr::from(([127, 0, 1, (i % 250) as u8 + 1], 4800));
        tokio::spawn(meshd::session::run(
            SessionConfig { state_dir, underlay, boot: 1, wireguard: None },
            tx,
            meshd::endpoints::Endpoints::new(),
        ));
        let connected = connected.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let SessionEvent::Connected = event {
                    connected.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    Ok(connected)
}

async fn wait(mut done: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
