//! `meshd check`: the host's prerequisites for `meshd run`, each failed one with its fix — root,
//! the tun device, nftables, network namespaces, cgroups for workload limits, a joined state
//! directory whose certificate is valid, and the managers reachable from here.

use std::path::Path;
use std::time::Duration;

use crate::identity::NodeDir;

/// One prerequisite: what it is, whether it holds, and how to fix it (or what was found).
pub struct Finding {
    pub what: &'static str,
    pub ok: bool,
    /// Only some services need it: a warning, not a failure.
    pub optional: bool,
    pub detail: String,
}

fn finding(what: &'static str, ok: bool, detail: impl Into<String>) -> Finding {
    Finding { what, ok, optional: false, detail: detail.into() }
}

/// A prerequisite whose `fix` is shown only when it fails.
fn need(what: &'static str, ok: bool, fix: &str) -> Finding {
    finding(what, ok, if ok { "" } else { fix })
}

fn runs(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Every prerequisite of `meshd run --state-dir state_dir`, checked now.
pub async fn check(state_dir: &Path) -> Vec<Finding> {
    let mut out = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    out.push(need(
        "running as root",
        root,
        "run meshd as root (it makes namespaces, tun devices and nftables rules)",
    ));
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
    out.push(match tun {
        Ok(_) => finding("/dev/net/tun opens", true, ""),
        Err(e) => finding(
            "/dev/net/tun opens",
            false,
            format!("{e}: modprobe tun (or give the container /dev/net/tun)"),
        ),
    });
    out.push(need("nftables (nft)", runs("nft", &["--version"]), "apt-get install nftables"));
    out.push(need(
        "network namespaces (ip netns)",
        runs("ip", &["netns", "list"]),
        "apt-get install iproute2",
    ));
    let cgroups = Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        || Path::new("/sys/fs/cgroup/memory").exists();
    out.push(Finding {
        optional: true,
        ..need(
            "cgroups (workload limits)",
            cgroups,
            "none mounted: services with --limit-cpu or --limit-memory cannot run here (mount cgroup2 on /sys/fs/cgroup)",
        )
    });
    let dir = NodeDir::new(state_dir);
    match dir.load() {
        Err(e) => out.push(finding("a joined node in the state directory", false, format!("{e}"))),
        Ok(node) => {
            out.push(finding("a joined node in the state directory", true, format!("node {}", node.id)));
            let now = time::OffsetDateTime::now_utc();
            let valid = node.info.not_before <= now && now < node.info.not_after;
            out.push(finding(
                "its certificate is valid now",
                valid,
                if valid {
                    format!("until {}", node.info.not_after)
                } else {
                    format!(
                        "valid {} to {}, it is {now}: check this host's clock (time skew), or join again",
                        node.info.not_before, node.info.not_after
                    )
                },
            ));
            let mut reached = Vec::new();
            for manager in &node.managers {
                let connect = tokio::time::timeout(
                    Duration::from_secs(3),
                    tokio::net::TcpStream::connect(manager.as_str()),
                );
                if matches!(connect.await, Ok(Ok(_))) {
                    reached.push(manager.clone());
                }
            }
            // The clock against the leader's: certificates are checked against both.
            match tokio::time::timeout(Duration::from_secs(5), node.leader()).await {
                Ok(Ok(leader)) => match leader.clock_skew_ms {
                    Some(skew) => out.push(finding(
                        "this host's clock agrees with control's",
                        skew.abs() <= MAX_SKEW_MS,
                        if skew.abs() <= MAX_SKEW_MS {
                            format!("{skew:+} ms against the leader {}", leader.addr)
                        } else {
                            format!(
                                "the leader {} is {skew:+} ms off this host (at most ±{MAX_SKEW_MS} ms): synchronize this host's clock (systemd-timesyncd, chrony)",
                                leader.addr
                            )
                        },
                    )),
                    None => out.push(Finding {
                        optional: true,
                        ..finding("this host's clock agrees with control's", false, "the leader does not say its time")
                    }),
                },
                Ok(Err(e)) => out.push(finding("the leader answers over mTLS", false, e.to_string())),
                Err(_) => out.push(finding("the leader answers over mTLS", false, "no answer within 5 s")),
            }
            out.push(finding(
                "a manager reachable (TCP)",
                !reached.is_empty(),
                if reached.is_empty() {
                    format!(
                        "none of {} answers: check the network and firewalls between this host and them",
                        node.managers.join(", ")
                    )
                } else {
                    reached.join(", ")
                },
            ));
        }
    }
    out
}

/// How far this host's clock may be from the leader's.
const MAX_SKEW_MS: i64 = 5_000;

/// Prints each finding; an error when one failed.
pub async fn run(state_dir: &Path) -> anyhow::Result<()> {
    let findings = check(state_dir).await;
    for f in &findings {
        let detail = if f.detail.is_empty() { String::new() } else { format!(": {}", f.detail) };
        let state = match (f.ok, f.optional) {
            (true, _) => "ok  ",
            (false, true) => "warn",
            (false, false) => "FAIL",
        };
        println!("{state}  {}{detail}", f.what);
    }
    let failed = findings.iter().filter(|f| !f.ok && !f.optional).count();
    anyhow::ensure!(failed == 0, "{failed} prerequisite(s) missing");
    Ok(())
}
