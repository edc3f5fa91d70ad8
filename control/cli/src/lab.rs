//! `meshctl lab`: a local cluster in network namespaces, as root.
//!
//! Hosts are namespaces `meshlab-h1..hN` joined by veth pairs to a bridge in a namespace of its
//! own (`meshlab-br`, underlay 10.77.0.0/24); a manager (`mesh-control`) runs in h1..hM and
//! `meshd` in every host, h1 included (the binaries next to this `meshctl`). `up` joins them,
//! applies a spec (networks, services, a policy, checks), checks what a user would and, with
//! several managers, that the leader's loss is survived; the lab keeps running until `down`.
//! What it made is listed in `STATE_DIR/lab.json`, so `down` removes exactly that.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

/// Prefix of every namespace the lab makes.
const PREFIX: &str = "meshlab";
/// The most hosts a lab has.
const MAX_HOSTS: usize = 50;
/// Pings between two workloads while the leading manager is killed.
const FAILOVER_PINGS: u32 = 500;
/// Where the lab keeps its files unless told otherwise.
pub const DEFAULT_DIR: &str = "/var/lib/mesh-lab";

/// A spec: what `lab up` creates and checks (see `examples/lab.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default, rename = "network")]
    networks: Vec<NetworkSpec>,
    #[serde(default, rename = "service")]
    services: Vec<ServiceSpec>,
    /// A policy file, relative to the spec.
    policy: Option<PathBuf>,
    #[serde(default, rename = "check")]
    checks: Vec<CheckSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetworkSpec {
    name: String,
    subnet: String,
    #[serde(default)]
    unencrypted: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSpec {
    name: String,
    networks: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default = "one")]
    replicas: u32,
    /// `{spec_dir}` is replaced by the spec's directory.
    command: Option<String>,
}

fn one() -> u32 {
    1
}

/// A request a workload makes, and the answer expected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSpec {
    name: String,
    /// The calling service (its first endpoint's namespace).
    from: String,
    url: String,
    #[serde(default = "get")]
    method: String,
    #[serde(default)]
    headers: Vec<String>,
    /// An HTTP status, or 0 for "no answer at all" (unreachable).
    expect: u16,
}

fn get() -> String {
    "GET".into()
}

/// What a running lab is made of.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    hosts: usize,
    dir: PathBuf,
    /// (host, pid, program) of every process the lab started.
    processes: Vec<(usize, u32, String)>,
}

fn host(i: usize) -> String {
    format!("{PREFIX}-h{i}")
}

fn bridge() -> String {
    format!("{PREFIX}-br")
}

fn address(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program} (is it installed?)"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn require_root() -> anyhow::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    ensure!(root, "the lab makes network namespaces: run it as root (sudo)");
    Ok(())
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
    run("apt-get", &["update", "-qq"])?;
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
    let dir = exe.parent().context("meshctl has no directory")?.to_owned();
    for b in ["mesh-control", "meshd"] {
        ensure!(
            dir.join(b).exists(),
            "{} is missing: build it (cargo build --release)",
            dir.join(b).display()
        );
    }
    Ok(dir)
}

/// The state directory of the manager on host `i` (h1's holds the admin bundle).
fn manager_dir(dir: &Path, i: usize) -> PathBuf {
    if i == 1 { dir.join("control") } else { dir.join(format!("control-h{i}")) }
}

fn manager_log(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("control-h{i}.log"))
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

fn load(dir: &Path) -> anyhow::Result<State> {
    let text = std::fs::read_to_string(state_file(dir))
        .with_context(|| format!("no lab in {} (start one with `meshctl lab up`)", dir.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn save(state: &State) -> anyhow::Result<()> {
    std::fs::write(state_file(&state.dir), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

/// Waits up to `limit` for `check`.
fn wait(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// A process left running in `ns` (its own process group, so it outlives meshctl), logging to
/// `log`.
fn spawn(ns: &str, program: &Path, args: &[&str], log: std::fs::File) -> anyhow::Result<u32> {
    use std::os::unix::process::CommandExt;
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .arg(program)
        .args(args)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

struct Lab {
    dir: PathBuf,
    bin: PathBuf,
}

impl Lab {
    fn meshctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &host(1)])
            .arg(self.bin.join("meshctl"))
            .args(args)
            .env("MESHCTL_ADMIN", self.dir.join("control/admin"))
            .output()?;
        ensure!(
            out.status.success(),
            "meshctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the manager of host `i`: `mesh-control ARGS` on its state directory, `run` when
    /// `args` is empty. The process replaces any earlier one of that manager in the state.
    fn start_manager(&self, state: &mut State, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let dir = manager_dir(&self.dir, i);
        let mut args: Vec<&str> = if args.is_empty() { vec!["run"] } else { args.to_vec() };
        let dir = dir.to_string_lossy();
        args.extend(["--state-dir", &dir]);
        // Appended to: a restarted manager's log follows the stopped one's.
        let log = std::fs::OpenOptions::new().create(true).append(true).open(manager_log(&self.dir, i))?;
        let pid = spawn(&host(i), &self.bin.join("mesh-control"), &args, log)?;
        state.processes.retain(|(h, _, what)| !(*h == i && what == "mesh-control"));
        state.processes.push((i, pid, "mesh-control".into()));
        save(state)
    }

    /// Every manager: (host, status as `node ls` shows it: leader, reachable, unreachable).
    fn managers(&self) -> anyhow::Result<Vec<(usize, String)>> {
        let nodes: serde_json::Value =
            serde_json::from_str(&self.meshctl(&["node", "ls", "--format", "json"])?)?;
        Ok(nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| {
                let control = n["control"].as_str()?;
                let i = (1..=MAX_HOSTS).find(|i| control == format!("{}:7400", address(*i)))?;
                Some((i, n["manager_status"].as_str()?.to_owned()))
            })
            .collect())
    }

    /// How many nodes hold a session with the leader.
    fn sessions(&self) -> usize {
        self.meshctl(&["node", "ls", "--format", "json"])
            .map_or(0, |j| j.matches("\"connected\": true").count())
    }

    /// The host whose manager leads.
    fn leader(&self) -> anyhow::Result<usize> {
        self.managers()?.into_iter().find(|(_, s)| s == "leader").map(|(i, _)| i).context("no manager leads")
    }

    /// The namespace of `service`'s first endpoint.
    fn workload(&self, service: &str) -> anyhow::Result<String> {
        let view: serde_json::Value = serde_json::from_str(&self.meshctl(&["service", "inspect", service])?)?;
        let endpoint = &view["endpoints"][0];
        let node = endpoint["node"].as_str().context("no endpoint")?;
        let slot = endpoint["slot"].as_u64().context("no slot")?;
        let nodes: serde_json::Value =
            serde_json::from_str(&self.meshctl(&["node", "ls", "--format", "json"])?)?;
        let hostname = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["id"] == node)
            .and_then(|n| n["hostname"].as_str())
            .context("the endpoint's node is not listed")?;
        Ok(format!("{hostname}-{service}-{slot}"))
    }
}

/// `meshctl lab up`.
pub fn up(hosts: usize, managers: Option<usize>, spec_path: &Path, dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    ensure!((2..=MAX_HOSTS).contains(&hosts), "--hosts must be between 2 and {MAX_HOSTS}");
    let managers = managers.unwrap_or(if hosts >= 3 { 3 } else { 1 });
    ensure!(
        managers % 2 == 1 && managers <= hosts,
        "--managers must be odd (a majority must survive a loss) and at most --hosts ({hosts})"
    );
    let spec_text =
        std::fs::read_to_string(spec_path).with_context(|| format!("cannot read {}", spec_path.display()))?;
    let spec: Spec =
        toml::from_str(&spec_text).with_context(|| format!("{} is not a lab spec", spec_path.display()))?;
    let spec_dir = spec_path.canonicalize()?.parent().map(Path::to_owned).unwrap_or_default();
    if state_file(dir).exists() {
        bail!("a lab is already up (state in {}): `meshctl lab down` first", dir.display());
    }
    ensure!(
        !run("ip", &["netns", "list"])?.lines().any(|l| l.starts_with(PREFIX)),
        "namespaces named {PREFIX}-* exist already: `meshctl lab down` removes them"
    );
    let bin = bin_dir()?;
    install_missing_tools()?;
    std::fs::create_dir_all(dir)?;
    let mut state = State { hosts, dir: dir.to_owned(), processes: Vec::new() };
    save(&state)?;
    let lab = Lab { dir: dir.to_owned(), bin: bin.clone() };
    let s = |p: &Path| p.to_string_lossy().into_owned();

    step(&format!("{hosts} hosts on one underlay bridge"));
    run("ip", &["netns", "add", &bridge()])?;
    run("ip", &["-n", &bridge(), "link", "add", "br0", "type", "bridge"])?;
    run("ip", &["-n", &bridge(), "link", "set", "br0", "up"])?;
    for i in 1..=hosts {
        let h = host(i);
        run("ip", &["netns", "add", &h])?;
        run(
            "ip",
            &[
                "link",
                "add",
                "eth0",
                "netns",
                &h,
                "type",
                "veth",
                "peer",
                "name",
                &format!("v{i}"),
                "netns",
                &bridge(),
            ],
        )?;
        run("ip", &["-n", &bridge(), "link", "set", &format!("v{i}"), "master", "br0", "up"])?;
        run("ip", &["-n", &h, "addr", "add", &format!("{}/24", address(i)), "dev", "eth0"])?;
        run("ip", &["-n", &h, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &h, "link", "set", "lo", "up"])?;
        println!("  {h}  {}", address(i));
    }

    let what =
        if managers == 1 { "mesh-control on h1".to_owned() } else { format!("managers on h1..h{managers}") };
    step(&format!("{what}, meshd on every host"));
    let control = format!("{}:7400", address(1));
    run(
        "ip",
        &[
            "netns",
            "exec",
            &host(1),
            &s(&bin.join("mesh-control")),
            "init",
            "--state-dir",
            &s(&manager_dir(dir, 1)),
            "--listen",
            &control,
            "--hostname",
            &host(1),
        ],
    )?;
    lab.start_manager(&mut state, 1, &[])?;
    ensure!(
        wait(Duration::from_secs(10), || lab.meshctl(&["node", "ls"]).is_ok()),
        "mesh-control did not come up (see {})",
        manager_log(dir, 1).display()
    );
    if managers > 1 {
        let token = lab.meshctl(&["join-token", "manager", "-q"])?.trim().to_owned();
        for i in 2..=managers {
            let listen = format!("{}:7400", address(i));
            lab.start_manager(
                &mut state,
                i,
                &[
                    "join",
                    "--control",
                    &control,
                    "--token",
                    &token,
                    "--listen",
                    &listen,
                    "--hostname",
                    &host(i),
                ],
            )?;
        }
        let all = wait(Duration::from_secs(30), || {
            lab.managers().is_ok_and(|m| m.iter().filter(|(_, s)| s == "reachable").count() == managers - 1)
        });
        ensure!(all, "not every manager joined the raft group (logs in {})", dir.display());
        println!("  {managers} managers, {} leads", host(lab.leader()?));
    }
    let token = lab.meshctl(&["join-token", "worker", "-q"])?.trim().to_owned();
    for i in 1..=hosts {
        let node_dir = dir.join(format!("h{i}"));
        run(
            "ip",
            &[
                "netns",
                "exec",
                &host(i),
                &s(&bin.join("meshd")),
                "join",
                "--control",
                &control,
                "--token",
                &token,
                "--state-dir",
                &s(&node_dir),
                "--hostname",
                &host(i),
            ],
        )?;
        let pid = spawn(
            &host(i),
            &bin.join("meshd"),
            &["run", "--state-dir", &s(&node_dir), "--underlay", &address(i), "--netns-prefix", &host(i)],
            std::fs::File::create(dir.join(format!("meshd-{i}.log")))?,
        )?;
        state.processes.push((i, pid, "meshd".into()));
        save(&state)?;
        println!("  {} joined", host(i));
    }
    let all = wait(Duration::from_secs(20), || lab.sessions() == hosts);
    ensure!(all, "not every meshd connected (logs in {})", dir.display());

    step(&format!("Applying {}", spec_path.display()));
    for n in &spec.networks {
        let mut args = vec!["network", "create", &n.name, "--subnet", &n.subnet];
        if n.unencrypted {
            args.push("--unencrypted");
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
        if let Some(c) = &svc.command {
            args.extend(["--command".into(), c.replace("{spec_dir}", &spec_dir.to_string_lossy())]);
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
        let ns = lab.workload(&svc.name);
        let up = ns.as_ref().is_ok_and(|ns| {
            wait(Duration::from_secs(20), || {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        ns,
                        "dig",
                        "+short",
                        "+time=1",
                        "+tries=1",
                        "@127.0.0.11",
                        &svc.name,
                    ])
                    .output()
                    .is_ok_and(|o| !o.stdout.is_empty())
            })
        });
        check(&format!("{} is up and its name resolves in its workload", svc.name), up);
    }
    for c in &spec.checks {
        let got = lab.workload(&c.from).ok().map(|ns| {
            let mut last = 0;
            // The first requests may race the workloads' start: a few tries for an expected answer.
            wait(Duration::from_secs(if c.expect == 0 { 1 } else { 10 }), || {
                last = http(&ns, c);
                last == c.expect
            });
            last
        });
        let shown = match got {
            Some(0) => "no answer".to_owned(),
            Some(code) => code.to_string(),
            None => "no workload".to_owned(),
        };
        check(
            &format!("{}: {} {} from {} -> {shown}", c.name, c.method, c.url, c.from),
            got == Some(c.expect),
        );
    }
    // A key rotation under traffic loses nothing: pings between two endpoints of one network on
    // different hosts while its key rotates.
    let pair = rotation_pair(&lab, &spec)?;
    if let Some((ns, to, network)) = &pair {
        let pinger = ping(ns, to, 300)?;
        std::thread::sleep(Duration::from_millis(800));
        let rotated = lab.meshctl(&["network", "rotate-key", network]);
        let lossless = rotated.is_ok() && lossless(pinger)?;
        check(&format!("a key rotation of `{network}` under traffic loses nothing (300 pings)"), lossless);
    }
    if managers > 1 {
        match failover(&lab, &mut state, hosts, pair.as_ref()) {
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
    println!("  stop:  meshctl lab down");
    ensure!(failed == 0, "{failed} check(s) failed");
    Ok(())
}

/// `count` pings, 10 ms apart, from namespace `ns` to `to`, running.
fn ping(ns: &str, to: &str, count: u32) -> anyhow::Result<std::process::Child> {
    let count = count.to_string();
    Ok(Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-q", "-c", &count, "-i", "0.01", "-W", "1", to])
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
fn failover(
    lab: &Lab,
    state: &mut State,
    hosts: usize,
    pair: Option<&(String, String, String)>,
) -> anyhow::Result<String> {
    let old = lab.leader()?;
    let pinger = pair.map(|(ns, to, _)| ping(ns, to, FAILOVER_PINGS)).transpose()?;
    std::thread::sleep(Duration::from_millis(500));
    let pid = state
        .processes
        .iter()
        .find(|(h, _, what)| *h == old && what == "mesh-control")
        .map(|(_, pid, _)| *pid)
        .context("the leading manager's process is not in the lab's state")?;
    let stopped = Instant::now();
    run("kill", &["-KILL", &pid.to_string()])?;
    let mut new = 0;
    let elected = wait(Duration::from_secs(20), || {
        new = lab.leader().ok().filter(|i| *i != old).unwrap_or(0);
        new != 0
    });
    ensure!(elected, "{} stopped and no other manager took the lead within 20 s", host(old));
    let elected = stopped.elapsed();
    ensure!(
        wait(Duration::from_secs(30), || lab.sessions() == hosts),
        "{} leads but not every meshd reconnected within 30 s",
        host(new)
    );
    let reconnected = stopped.elapsed();
    if let Some(pinger) = pinger {
        ensure!(lossless(pinger)?, "pings between workloads were lost during the failover");
    }
    lab.start_manager(state, old, &[])?;
    let rejoined = wait(Duration::from_secs(30), || {
        lab.managers().is_ok_and(|m| m.iter().any(|(i, s)| *i == old && s == "reachable"))
    });
    ensure!(rejoined, "{} was restarted but did not rejoin within 30 s", host(old));
    Ok(format!(
        "the leading manager ({}) is killed: {} leads after {:.1} s, every meshd's session is back after \
         {:.1} s{}; restarted, {} follows",
        host(old),
        host(new),
        elected.as_secs_f64(),
        reconnected.as_secs_f64(),
        if pair.is_some() {
            format!(", {FAILOVER_PINGS} pings between workloads lose nothing")
        } else {
            String::new()
        },
        host(old)
    ))
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// Runs `check`'s request with curl in `ns`; the status, 0 for no answer.
fn http(ns: &str, check: &CheckSpec) -> u16 {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "3",
        "-w",
        "%{http_code}",
        "-X",
        &check.method,
    ]);
    for h in &check.headers {
        cmd.args(["-H", h]);
    }
    cmd.arg(&check.url);
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
    let state = load(dir)?;
    ensure!(!command.is_empty(), "nothing to run: meshctl lab exec HOST[/SERVICE] -- CMD...");
    let (h, service) = match target.split_once('/') {
        Some((h, s)) => (h, Some(s)),
        None => (target, None),
    };
    let i: usize = h
        .strip_prefix('h')
        .and_then(|n| n.parse().ok())
        .filter(|i| (1..=state.hosts).contains(i))
        .with_context(|| format!("`{h}` is not a host of the lab (h1..h{})", state.hosts))?;
    let ns = match service {
        None => host(i),
        Some(s) => {
            let prefix = format!("{}-{s}-", host(i));
            run("ip", &["netns", "list"])?
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .find(|n| n.starts_with(&prefix))
                .map(str::to_owned)
                .with_context(|| format!("no endpoint of `{s}` on {h}"))?
        }
    };
    let status = Command::new("ip")
        .args(["netns", "exec", &ns])
        .args(command)
        .env("MESHCTL_ADMIN", dir.join("control/admin"))
        .env("PATH", format!("{}:{}", bin_dir()?.display(), std::env::var("PATH").unwrap_or_default()))
        .status()
        .with_context(|| format!("running {}", command[0]))?;
    Ok(status.code().unwrap_or(1))
}

/// `meshctl lab status`.
pub fn status(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let state = load(dir)?;
    println!("lab in {}: {} hosts", dir.display(), state.hosts);
    for (i, pid, what) in &state.processes {
        let alive = Path::new(&format!("/proc/{pid}")).exists();
        println!(
            "  {}  {}  {what} pid {pid} {}",
            host(*i),
            address(*i),
            if alive { "running" } else { "NOT RUNNING" }
        );
    }
    let lab = Lab { dir: dir.to_owned(), bin: bin_dir()? };
    match lab.meshctl(&["node", "ls"]) {
        Ok(nodes) => print!("\n{nodes}"),
        Err(e) => println!("\ncontrol does not answer: {e}"),
    }
    if let Ok(services) = lab.meshctl(&["service", "ls"]) {
        print!("\n{services}");
    }
    let namespaces: Vec<String> = run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect();
    println!("\nnamespaces: {}", namespaces.join(" "));
    Ok(())
}

/// `meshctl lab down`: stops every process, removes every namespace and the lab's files.
pub fn down(dir: &Path) -> anyhow::Result<()> {
    require_root()?;
    let state = load(dir).unwrap_or(State { dir: dir.to_owned(), ..State::default() });
    // meshd first: it removes its workload namespaces as it stops.
    let mut pids: Vec<(usize, u32, String)> = state.processes.clone();
    pids.sort_by_key(|(_, _, what)| what == "mesh-control");
    for (_, pid, _) in &pids {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    wait(Duration::from_secs(5), || pids.iter().all(|(_, p, _)| !Path::new(&format!("/proc/{p}")).exists()));
    let namespaces: Vec<String> = run("ip", &["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{PREFIX}-")))
        .map(str::to_owned)
        .collect();
    for ns in &namespaces {
        if let Ok(out) = run("ip", &["netns", "pids", ns]) {
            for pid in out.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = run("ip", &["netns", "del", ns]);
        let _ = std::fs::remove_dir_all(Path::new("/etc/netns").join(ns));
    }
    if dir.join("lab.json").exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    println!("lab down: {} process(es) stopped, {} namespace(s) removed", pids.len(), namespaces.len());
    Ok(())
}
