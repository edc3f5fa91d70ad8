//! Fan-out: how long a key rotation, and one more endpoint, take to reach every node's session,
//! and the manager's memory per session.
//!
//! Runs the real `mesh-control` binary in its own process (so its memory can be read alone),
//! joins N nodes through meshd's join code, opens N real sessions (gRPC over mTLS, in this
//! process), places one endpoint on every node on one encrypted network, then rotates the key
//! several times and times each rotation until the last node holds the new epoch; then adds one
//! endpoint at a time (a new one-endpoint service) and times each until the last node holds it
//! as a peer.
//!
//!     cargo build --release -p control
//!     cargo run --release -p benches --bin fanout -- --nodes 100,1000

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use benches::ManagerProcess;
use clap::Parser;
use mesh_api::client::AdminClient;
use mesh_api::keys::KeyUse;
use mesh_api::proto::pb;
use mesh_api::tokens::Role;
use meshd::session::{SessionConfig, SessionEvent};

#[derive(Parser)]
#[command(about = "Time for a network key rotation to reach N nodes; manager memory per session")]
struct Args {
    /// Node counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    nodes: Vec<usize>,
    /// Rotations timed per node count.
    #[arg(long, default_value_t = 5)]
    rotations: usize,
    /// The mesh-control binary.
    #[arg(long, default_value = "target/release/mesh-control")]
    mesh_control: PathBuf,
    /// Write the results as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Measured {
    nodes: usize,
    rotation_ms: Vec<f64>,
    median_ms: f64,
    max_ms: f64,
    manager_rss_before_kib: u64,
    manager_rss_after_kib: u64,
    kib_per_session: f64,
    /// One more endpoint on the network: time until every node holds it as a peer.
    scale_ms: Vec<f64>,
    scale_median_ms: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let limit = rlimit::increase_nofile_limit(1 << 16)?;
    let mut results = Vec::new();
    for &n in &args.nodes {
        anyhow::ensure!((n as u64) * 3 + 100 < limit, "open file limit {limit} is too low for {n} nodes");
        results.push(measure(&args, n).await?);
    }
    println!(
        "\n| nodes | rotation reaches all (median) | max | one more endpoint reaches all (median) | manager RSS per session |"
    );
    println!("|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} KiB |",
            r.nodes, r.median_ms, r.max_ms, r.scale_median_ms, r.kib_per_session
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)?;
    }
    Ok(())
}

async fn measure(args: &Args, n: usize) -> anyhow::Result<Measured> {
    eprintln!("== {n} nodes: starting mesh-control");
    let dir = tempfile::tempdir()?;
    let manager = ManagerProcess::init(&args.mesh_control, dir.path()).await?;
    let bundle = manager.bundle()?;
    let mut admin = AdminClient::connect(&bundle).await?;
    let token = admin.join_token(Role::Worker, false).await?;
    let nodes_dir = tempfile::tempdir()?;
    eprintln!("   joining {n} nodes");
    let mut joined = Vec::new();
    // A few at a time: every simulated node joins from 127.0.0.1, and the control port holds at
    // most 16 certificate-less connections per source address.
    for chunk in (0..n).collect::<Vec<_>>().chunks(5) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let dir = nodes_dir.path().join(format!("n{i}"));
            let control = bundle.managers.join(",");
            let token = token.clone();
            tasks.push(tokio::spawn(async move {
                meshd::identity::join(&control, &token, &dir, &format!("sim{i}")).await.map(|_| dir)
            }));
        }
        for t in tasks {
            joined.push(t.await??);
        }
    }
    let before = manager.rss_kib()?;
    eprintln!("   opening {n} sessions");
    let epochs: Arc<Mutex<HashMap<usize, (u32, Instant)>>> = Arc::new(Mutex::new(HashMap::new()));
    // Node -> (peers it holds, when it learnt them).
    let peers: Arc<Mutex<HashMap<usize, (usize, Instant)>>> = Arc::new(Mutex::new(HashMap::new()));
    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for (i, dir) in joined.iter().enumerate() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Control registers the IP a session comes from: every simulated node is on loopback,
        // told apart by its port.
        let underlay = SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
        let config = SessionConfig { state_dir: dir.clone(), underlay, boot: 1, wireguard: None };
        tokio::spawn(meshd::session::run(config, tx, meshd::endpoints::Endpoints::new()));
        let epochs = epochs.clone();
        let peers = peers.clone();
        let connected = connected.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                match event {
                    SessionEvent::Connected => {
                        connected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    SessionEvent::Slice(slice) => {
                        let epoch = slice
                            .networks
                            .iter()
                            .flat_map(|n| n.ring.iter())
                            .find(|(u, _)| *u == KeyUse::Current)
                            .map(|(_, e)| *e);
                        if let Some(epoch) = epoch {
                            epochs.lock().unwrap().insert(i, (epoch, Instant::now()));
                        }
                        let held = slice.networks.iter().map(|n| n.peers.len()).sum();
                        let mut peers = peers.lock().unwrap();
                        if peers.get(&i).is_none_or(|(p, _)| *p != held) {
                            peers.insert(i, (held, Instant::now()));
                        }
                    }
                    SessionEvent::Disconnected(_) => {}
                }
            }
        });
    }
    wait(|| connected.load(std::sync::atomic::Ordering::Relaxed) >= n, "every session to open").await?;
    // Let the manager see every session as connected before placing.
    for _ in 0..100 {
        if admin.list_nodes().await?.iter().filter(|x| x.connected).count() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = manager.rss_kib()?;
    admin.create_network("bench", "10.200.0.0/16", true).await?;
    admin.create_service(bench_service("fan", n)).await?;
    wait(|| epochs.lock().unwrap().len() >= n, "every node to hold the network").await?;

    let mut times = Vec::new();
    for r in 0..args.rotations {
        let target = admin.inspect_network("bench").await?.key_epoch.unwrap_or(0) + 1;
        let start = Instant::now();
        admin.rotate_network_key("bench").await?;
        let ms = reached_all(&epochs, n, |e| e >= target, start, "the rotation to reach every node").await?;
        eprintln!("   rotation {}: {ms:.1} ms to reach all {n}", r + 1);
        times.push(ms);
    }
    let mut scale_ms = Vec::new();
    for r in 0..args.rotations {
        // At most one endpoint of a service per node: each round a new one-endpoint service.
        let replicas = n + r + 1;
        let start = Instant::now();
        admin.create_service(bench_service(&format!("extra{r}"), 1)).await?;
        let ms =
            reached_all(&peers, n, |p| p >= replicas, start, "the new endpoint to reach every node").await?;
        eprintln!("   endpoint {replicas}: {ms:.1} ms to reach all {n}");
        scale_ms.push(ms);
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mut scale_sorted = scale_ms.clone();
    scale_sorted.sort_by(|a, b| a.total_cmp(b));
    Ok(Measured {
        nodes: n,
        median_ms: sorted[sorted.len() / 2],
        max_ms: *sorted.last().unwrap(),
        rotation_ms: times,
        manager_rss_before_kib: before,
        manager_rss_after_kib: after,
        kib_per_session: (after.saturating_sub(before)) as f64 / n as f64,
        scale_median_ms: scale_sorted[scale_sorted.len() / 2],
        scale_ms,
    })
}

/// A service on the bench network with `replicas` endpoints.
fn bench_service(name: &str, replicas: usize) -> pb::CreateServiceRequest {
    pb::CreateServiceRequest {
        name: name.into(),
        networks: vec!["bench".into()],
        ports: vec![pb::Port { port: 80, protocol: "tcp".into() }],
        replicas: replicas as u32,
        constraints: vec![],
        command: String::new(),
        run: None,
        signed: None,
        publish: vec![],
    }
}

/// Waits until all `n` nodes of `seen` (node -> (value, when it was seen)) hold a value that
/// `reached` accepts; returns the milliseconds from `start` to the last of them.
async fn reached_all<V: Copy>(
    seen: &Mutex<HashMap<usize, (V, Instant)>>,
    n: usize,
    reached: impl Fn(V) -> bool,
    start: Instant,
    what: &str,
) -> anyhow::Result<f64> {
    wait(|| seen.lock().unwrap().values().filter(|(v, _)| reached(*v)).count() >= n, what).await?;
    let last = seen.lock().unwrap().values().map(|(_, t)| *t).max().expect("n > 0 nodes");
    Ok(last.duration_since(start).as_secs_f64() * 1000.0)
}

async fn wait(mut done: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}
