//! `meshctl lab up|exec|status|down`: a persistent [`Lab`] in `DIR`, built from a spec and
//! checked as a user would (or bare: hosts, managers and meshd joined, for scripts), then used
//! and removed by later commands through its record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ipnet::Ipv4Net;

use super::spec::{CheckSpec, Spec};
use super::topology::env_path;
use super::{DEFAULT_PREFIX, Lab, LabError, MAX_HOSTS, MeshdOn, Topology, require_root, sweep, wait};

/// Where the lab keeps its files unless told otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/mesh-lab";
/// Pings between two workloads while the leading manager is killed.
const FAILOVER_PINGS: u32 = 500;

/// What `meshctl lab up` builds.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub hosts: usize,
    /// Managers on h1..hM: 3 from three hosts on, else 1, when not given.
    pub managers: Option<usize>,
    pub spec: PathBuf,
    pub dir: PathBuf,
    pub prefix: String,
    pub subnet: Ipv4Net,
    pub meshd: MeshdOn,
    /// Only the hosts and the cluster, joined: no spec, no checks.
    pub bare: bool,
}

/// The tools the lab runs, by the Debian package that has them: installed through apt when
/// missing.
const TOOLS: [(&str, &str); 7] = [
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("ping", "iputils-ping"),
    ("curl", "curl"),
    ("dig", "bind9-dnsutils"),
    ("nft", "nftables"),
    ("python3", "python3"),
];

fn install_missing_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing {} (apt)", missing.join(" "));
    let update = Command::new("apt-get").args(["update", "-qq"]).output()?;
    ensure!(update.status.success(), "apt-get update: {}", String::from_utf8_lossy(&update.stderr).trim());
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    let out = Command::new("apt-get").args(&args).env("DEBIAN_FRONTEND", "noninteractive").output()?;
    ensure!(
        out.status.success(),
        "apt-get install {}: {}",
        missing.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The directory holding mesh-control and meshd: next to this meshctl.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("where is meshctl?")?;
    Ok(exe.parent().context("meshctl has no directory")?.to_owned())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// `meshctl lab up`.
pub fn up(options: &UpOptions) -> anyhow::Result<()> {
    require_root()?;
    let hosts = options.hosts;
    ensure!((2..=MAX_HOSTS).contains(&hosts), "--hosts must be between 2 and {MAX_HOSTS}");
    let managers = options.managers.unwrap_or(if hosts >= 3 { 3 } else { 1 });
    ensure!(
        managers % 2 == 1 && managers <= hosts,
        "--managers must be odd (a majority must survive a loss) and at most --hosts ({hosts})"
    );
    let spec = if options.bare {
        None
    } else {
        let path = &options.spec;
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let spec: Spec =
            toml::from_str(&text).with_context(|| format!("{} is not a lab spec", path.display()))?;
        let spec_dir = path.canonicalize()?.parent().map(Path::to_owned).unwrap_or_default();
        Some((spec, spec_dir))
    };
    let mut topology = Topology::new(&options.prefix, hosts, &options.dir, bin_dir()?);
    topology.subnet = options.subnet.trunc();
    topology.managers = managers;
    topology.meshd = options.meshd;
    topology.persistent = true;
    topology.check()?;
    install_missing_tools()?;
    let mut lab = Lab::create(topology)?;
    let t = lab.topology().clone();

    step(&format!("{hosts} hosts on one underlay bridge"));
    for i in 1..=hosts {
        println!("  {}  {}", t.host(i), t.addr(i));
    }
    let what =
        if managers == 1 { "mesh-control on h1".to_owned() } else { format!("managers on h1..h{managers}") };
    let meshd = match (t.meshd, t.meshd_hosts()) {
        (MeshdOn::Every, _) => "meshd on every host".to_owned(),
        (MeshdOn::Workers, r) if r.start() == r.end() => format!("meshd on h{}", r.start()),
        (MeshdOn::Workers, r) => format!("meshd on h{}..h{}", r.start(), r.end()),
    };
    step(&format!("{what}, {meshd}"));
    let init = lab.init_cluster()?;
    if options.bare {
        print!("{}", indent(&init));
    }
    lab.start_managers()?;
    if managers > 1 {
        println!("  {managers} managers, {} leads", t.host(lab.leader()?.context("no manager leads")?));
    }
    let token = lab.worker_token()?;
    for i in t.meshd_hosts() {
        let id = lab.join_node(i, &token)?;
        if options.bare {
            println!("  {} joined as {id}", t.host(i));
        } else {
            println!("  {} joined", t.host(i));
        }
    }
    lab.wait_for_sessions()?;
    let dir = lab.dir().to_owned();
    let Some((spec, spec_dir)) = spec else {
        println!("\n  the lab is up; state in {} (for scripts: {})", dir.display(), env_path(&dir).display());
        println!("  stop:  meshctl lab down --dir {}", dir.display());
        return Ok(());
    };
    let s = |p: &Path| p.to_string_lossy().into_owned();

    step(&format!("Applying {}", options.spec.display()));
    // Outside namespaces first: their servers are up when the checks start.
    let mut outside = BTreeMap::new();
    for (index, o) in (0u32..).zip(&spec.outside) {
        let ns = lab.add_outside_at(&o.name, index, o.address)?;
        if let Some(c) = &o.command {
            lab.start_outside(&ns, &c.replace("{spec_dir}", &spec_dir.to_string_lossy()))?;
        }
        println!(
            "  outside `{}` at {} (namespace {ns}), on the underlay bridge, in no cluster",
            o.name, o.address
        );
        outside.insert(o.name.clone(), ns);
    }
    for n in &spec.networks {
        let mut args = vec!["network", "create", &n.name, "--subnet", &n.subnet];
        if n.unencrypted {
            args.push("--unencrypted");
        }
        if let Some(transport) = &n.transport {
            args.extend(["--transport", transport]);
        }
        print!("  {}", lab.meshctl(&args)?);
    }
    for svc in &spec.services {
        let replicas = svc.replicas.to_string();
        let mut args: Vec<String> =
            vec!["service".into(), "create".into(), svc.name.clone(), "--replicas".into(), replicas];
        for n in &svc.networks {
            args.extend(["--network".into(), n.clone()]);
        }
        for p in &svc.ports {
            args.extend(["--port".into(), p.clone()]);
        }
        for p in &svc.publish {
            args.extend(["--publish".into(), p.clone()]);
        }
        if let Some(c) = &svc.command {
            args.extend(["--command".into(), c.replace("{spec_dir}", &spec_dir.to_string_lossy())]);
            // The spec's files are the workload's to read wherever the spec lives (under /tmp,
            // say, which the workload's own /tmp covers).
            if c.contains("{spec_dir}") {
                args.extend(["--readable".into(), spec_dir.to_string_lossy().into_owned()]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        print!("{}", indent(&lab.meshctl(&args)?));
    }
    if let Some(policy) = &spec.policy {
        let path = spec_dir.join(policy);
        print!("{}", indent(&lab.meshctl(&["policy", "apply", &s(&path)])?));
    }

    step("Checks");
    let mut passed = 0;
    let mut failed = 0;
    let mut check = |what: &str, ok: bool| {
        println!("  {}  {what}", if ok { "ok  " } else { "FAIL" });
        if ok { passed += 1 } else { failed += 1 }
    };
    // Every endpoint running, with its address, and resolvable by name from its own workload.
    for svc in &spec.services {
        let ns = workload(&lab, &svc.name);
        let up = ns.as_ref().is_ok_and(|ns| {
            wait(Duration::from_secs(20), || {
                lab.exec(ns, &["dig", "+short", "+time=1", "+tries=1", "@127.0.0.11", &svc.name])
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty())
            })
        });
        check(&format!("{} is up and its name resolves in its workload", svc.name), up);
    }
    // The answer to check `c`: the first requests may race the workloads' start, so a few tries
    // for an expected answer.
    let url = |c: &CheckSpec| {
        (1..=hosts).fold(c.url.clone(), |u, i| u.replace(&format!("{{h{i}}}"), &t.addr(i).to_string()))
    };
    let answer = |c: &CheckSpec| {
        let from = match outside.get(&c.from) {
            Some(ns) => Ok(ns.clone()),
            None => workload(&lab, &c.from),
        };
        from.ok().map(|ns| {
            let mut last = 0;
            wait(Duration::from_secs(if c.expect == 0 { 1 } else { 10 }), || {
                last = http(&lab, &ns, c, &url(c));
                last == c.expect
            });
            last
        })
    };
    for c in &spec.checks {
        let got = answer(c);
        let shown = match got {
            Some(0) => "no answer".to_owned(),
            Some(code) => code.to_string(),
            None => "no workload".to_owned(),
        };
        check(
            &format!("{}: {} {} from {} -> {shown}", c.name, c.method, url(c), c.from),
            got == Some(c.expect),
        );
    }
    // A key rotation under traffic loses nothing: pings between two endpoints of one network on
    // different hosts while its key rotates.
    let pair = rotation_pair(&lab, &spec)?;
    if let Some((ns, to, network)) = &pair {
        let pinger = ping(&lab, ns, to, 300)?;
        std::thread::sleep(Duration::from_millis(800));
        let rotated = lab.meshctl(&["network", "rotate-key", network]);
        let lossless = rotated.is_ok() && lossless(pinger)?;
        check(&format!("a key rotation of `{network}` under traffic loses nothing (300 pings)"), lossless);
    }
    // A rolling update: every endpoint of the first service with a command restarted in turn,
    // and every check passes again after it.
    if let Some(svc) = spec.services.iter().find(|s| s.command.is_some()) {
        let out = lab.meshctl(&["service", "update", &svc.name, "--force", "--update-monitor", "1s"]);
        let rolled = out.as_ref().is_ok_and(|o| o.contains("every endpoint runs version"));
        let passing = spec.checks.iter().all(|c| answer(c) == Some(c.expect));
        check(
            &format!(
                "a rolling update of `{}` (each endpoint restarted in turn) completes, and every check passes after it",
                svc.name
            ),
            rolled && passing,
        );
    }
    // A root CA rotation under traffic: every node renews from a new root, the old one is then
    // trusted nowhere, no ping is lost and every check passes after it.
    {
        let pinger = pair.as_ref().map(|(ns, to, _)| ping(&lab, ns, to, 300)).transpose()?;
        std::thread::sleep(Duration::from_millis(300));
        let before = ca_roots(&lab)?;
        let rotated = lab.meshctl(&["cluster", "ca", "--rotate"]).is_ok();
        let after = ca_roots(&lab)?;
        let lossless = match pinger {
            Some(p) => lossless(p)?,
            None => true,
        };
        let passing = spec.checks.iter().all(|c| answer(c) == Some(c.expect));
        let replaced = after.len() == 1 && !before.contains(&after[0]);
        check(
            &format!(
                "a root CA rotation under traffic: every node renews from the new root {}, the old one is trusted no more, no ping lost, every check passes after it",
                after.first().map_or("-", |d| &d[..12.min(d.len())])
            ),
            rotated && replaced && lossless && passing,
        );
    }
    if managers > 1 {
        match failover(&mut lab, pair.as_ref()) {
            Ok(seen) => check(&seen, true),
            Err(e) => check(&format!("the leading manager stops: {e:#}"), false),
        }
    }

    step("Summary");
    println!("{}", indent(&lab.meshctl(&["node", "ls"])?));
    println!("{}", indent(&lab.meshctl(&["service", "ls"])?));
    println!("  checks: {passed} passed, {failed} failed");
    println!("  the lab is running; state in {}", dir.display());
    println!("  try:   meshctl lab exec h1 -- meshctl node ls");
    println!("         meshctl lab exec h2/<service> -- curl -s http://<service>/");
    for o in &spec.outside {
        println!(
            "         meshctl lab exec {} -- curl -s http://{}:PORT/   # a published port, from outside",
            o.name,
            t.addr(2)
        );
    }
    println!("  stop:  meshctl lab down");
    ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

/// The digests of the roots the cluster trusts, the signing one first.
fn ca_roots(lab: &Lab) -> anyhow::Result<Vec<String>> {
    let ca: serde_json::Value = serde_json::from_str(&lab.meshctl(&["cluster", "ca", "--format", "json"])?)?;
    Ok(ca["roots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some(r["digest"].as_str()?.to_owned()))
        .collect())
}

/// The namespace of `service`'s first endpoint.
fn workload(lab: &Lab, service: &str) -> anyhow::Result<String> {
    let view: serde_json::Value = serde_json::from_str(&lab.meshctl(&["service", "inspect", service])?)?;
    let endpoint = &view["endpoints"][0];
    let node = endpoint["node"].as_str().context("no endpoint")?;
    let slot = endpoint["slot"].as_u64().context("no slot")?;
    let nodes: serde_json::Value = serde_json::from_str(&lab.meshctl(&["node", "ls", "--format", "json"])?)?;
    let hostname = nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["id"] == node)
        .and_then(|n| n["hostname"].as_str())
        .context("the endpoint's node is not listed")?;
    Ok(format!("{hostname}-{service}-{slot}"))
}

/// `count` pings, 10 ms apart, from namespace `ns` to `to`, running.
fn ping(lab: &Lab, ns: &str, to: &str, count: u32) -> anyhow::Result<std::process::Child> {
    let count = count.to_string();
    Ok(lab
        .exec(ns, &["ping", "-q", "-c", &count, "-i", "0.01", "-W", "1", to])
        .stdout(Stdio::piped())
        .spawn()?)
}

/// Whether a `ping` started by [`ping`] lost nothing.
fn lossless(pinger: std::process::Child) -> anyhow::Result<bool> {
    let out = pinger.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).contains(" 0% packet loss"))
}

/// The leading manager is killed while two workloads ping each other: another manager takes the
/// lead, every meshd's session comes back and no ping is lost. The stopped manager is then
/// restarted and rejoins. Returns what it saw.
fn failover(lab: &mut Lab, pair: Option<&(String, String, String)>) -> anyhow::Result<String> {
    let host = |i: usize| lab.host(i);
    let old = lab.leader()?.context("no manager leads")?;
    let (old_name, meshd) = (host(old), lab.topology().meshd_hosts().count());
    let pinger = pair.map(|(ns, to, _)| ping(lab, ns, to, FAILOVER_PINGS)).transpose()?;
    std::thread::sleep(Duration::from_millis(500));
    let stopped = Instant::now();
    lab.kill_manager(old)?;
    let mut new = 0;
    let elected = wait(Duration::from_secs(20), || {
        new = lab.leader().ok().flatten().filter(|i| *i != old).unwrap_or(0);
        new != 0
    });
    ensure!(elected, "{old_name} stopped and no other manager took the lead within 20 s");
    let elected = stopped.elapsed();
    ensure!(
        wait(Duration::from_secs(30), || lab.sessions().is_ok_and(|n| n == meshd)),
        "{} leads but not every meshd reconnected within 30 s",
        lab.host(new)
    );
    let reconnected = stopped.elapsed();
    if let Some(pinger) = pinger {
        ensure!(lossless(pinger)?, "pings between workloads were lost during the failover");
    }
    lab.start_manager(old)?;
    let rejoined = wait(Duration::from_secs(30), || {
        lab.managers().is_ok_and(|m| m.iter().any(|(i, s)| *i == old && s == "reachable"))
    });
    ensure!(rejoined, "{old_name} was restarted but did not rejoin within 30 s");
    Ok(format!(
        "the leading manager ({old_name}) is killed: {} leads after {:.1} s, every meshd's session is back \
         after {:.1} s{}; restarted, {old_name} follows",
        lab.host(new),
        elected.as_secs_f64(),
        reconnected.as_secs_f64(),
        if pair.is_some() {
            format!(", {FAILOVER_PINGS} pings between workloads lose nothing")
        } else {
            String::new()
        },
    ))
}

/// Runs `check`'s request with curl in `ns`; the status, 0 for no answer.
fn http(lab: &Lab, ns: &str, check: &CheckSpec, url: &str) -> u16 {
    let mut cmd = lab
        .exec(ns, &["curl", "-s", "-o", "/dev/null", "-m", "3", "-w", "%{http_code}", "-X", &check.method]);
    for h in &check.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(url);
    cmd.output().ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(0)
}

/// Two endpoints of one encrypted network on different hosts: (namespace, address to ping,
/// network).
fn rotation_pair(lab: &Lab, spec: &Spec) -> anyhow::Result<Option<(String, String, String)>> {
    let nodes: serde_json::Value = serde_json::from_str(&lab.meshctl(&["node", "ls", "--format", "json"])?)?;
    let hostname = |id: &serde_json::Value| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| &n["id"] == id)
            .and_then(|n| n["hostname"].as_str())
            .map(str::to_owned)
    };
    let mut by_network: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for svc in &spec.services {
        let view: serde_json::Value =
            serde_json::from_str(&lab.meshctl(&["service", "inspect", &svc.name])?)?;
        for e in view["endpoints"].as_array().into_iter().flatten() {
            let Some(h) = hostname(&e["node"]) else { continue };
            let ns = format!("{h}-{}-{}", svc.name, e["slot"]);
            for (network, addr) in e["addresses"].as_object().into_iter().flatten() {
                by_network
                    .entry(network.clone())
                    .or_default()
                    .push((ns.clone(), addr.as_str().unwrap_or("").to_owned()));
            }
        }
    }
    for n in spec.networks.iter().filter(|n| !n.unencrypted) {
        let Some(list) = by_network.get(&n.name) else { continue };
        let host_of = |ns: &str| ns.split('-').take(2).collect::<Vec<_>>().join("-");
        if let Some((a, b)) = list
            .iter()
            .flat_map(|a| list.iter().map(move |b| (a, b)))
            .find(|(a, b)| host_of(&a.0) != host_of(&b.0))
        {
            return Ok(Some((a.0.clone(), b.1.clone(), n.name.clone())));
        }
    }
    Ok(None)
}

/// `meshctl lab exec HOST[/SERVICE] -- CMD...`: runs CMD in a host or a service's workload.
pub fn exec(dir: &Path, target: &str, command: &[String]) -> anyhow::Result<i32> {
    require_root()?;
    let lab = Lab::open(dir)?;
    ensure!(!command.is_empty(), "nothing to run: meshctl lab exec HOST[/SERVICE] -- CMD...");
    let (h, service) = match target.split_once('/') {
        Some((h, s)) => (h, Some(s)),
        None => (target, None),
    };
    // An outside namespace of the spec (`internet`), by its name.
    let outside = format!("{}-{h}", lab.prefix());
    let host = h.strip_prefix('h').and_then(|n| n.parse().ok()).filter(|i| (1..=lab.hosts()).contains(i));
    if host.is_none() && service.is_none() && lab.namespaces().contains(&outside) {
        return run_in(&lab, &outside, command);
    }
    let i: usize = host.with_context(|| {
        format!("`{h}` is not a host of the lab (h1..h{}) nor one of its outside namespaces", lab.hosts())
    })?;
    let ns = match service {
        None => lab.host(i),
        Some(s) => {
            let prefix = format!("{}-{s}-", lab.host(i));
            lab.namespaces()
                .into_iter()
                .find(|n| n.starts_with(&prefix))
                .with_context(|| format!("no endpoint of `{s}` on {h}"))?
        }
    };
    run_in(&lab, &ns, command)
}

/// Runs `command` in namespace `ns`, with the lab's binaries first on its path; its exit code.
fn run_in(lab: &Lab, ns: &str, command: &[String]) -> anyhow::Result<i32> {
    let status = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(command)
        .env("MESHCTL_ADMIN", lab.admin_dir())
        .env("PATH", format!("{}:{}", lab.bin().display(), std::env::var("PATH").unwrap_or_default()))
        .status()
        .with_context(|| format!("running {}", command[0]))?;
    Ok(status.code().unwrap_or(1))
}

/// `meshctl lab status`.
pub fn status(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let lab = Lab::open(dir)?;
    println!("lab in {}: {} hosts", dir.display(), lab.hosts());
    for p in lab.processes() {
        println!(
            "  {}  {}  {} pid {} {}",
            lab.host(p.host),
            lab.addr(p.host),
            p.program,
            p.pid,
            if lab.is_running(p) { "running" } else { "NOT RUNNING" }
        );
    }
    match lab.meshctl(&["node", "ls"]) {
        Ok(nodes) => print!("\n{nodes}"),
        Err(e) => println!("\ncontrol does not answer: {e}"),
    }
    if let Ok(services) = lab.meshctl(&["service", "ls"]) {
        print!("\n{services}");
    }
    println!("\nnamespaces: {}", lab.namespaces().join(" "));
    Ok(())
}

/// `meshctl lab down`: stops every process, removes every namespace and the lab's files. Without
/// a readable record, removes what a lab with the default prefix left.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let removed = match Lab::open(dir) {
        Ok(lab) => lab.down()?,
        Err(e) => {
            if !matches!(e, LabError::NoLab(_)) {
                eprintln!("meshctl: {e}; removing what a lab named {DEFAULT_PREFIX}-* left");
            }
            let removed = sweep(DEFAULT_PREFIX);
            if dir.join("lab.json").exists() {
                std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
            removed
        }
    };
    println!(
        "lab down: {} process(es) stopped, {} namespace(s) removed",
        removed.processes, removed.namespaces
    );
    Ok(())
}
