//! `meshctl check`: the cluster as an admin sees it, each problem with the command that fixes
//! it: managers and quorum, nodes down, certificates close to expiry, endpoints not running,
//! rolling updates paused, network keys whose rotation is overdue, policy rules that can never
//! match (a port no service declares, an HTTP rule on a TCP port), a root CA rotation held up
//! and a root close to its end.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_api::client::AdminClient;
use mesh_api::model::NodeState;
use mesh_api::proto::{ClusterView, EndpointPsView, NetworkView, NodeView, ServiceView};
use time::OffsetDateTime;

/// One thing wrong, and how to fix it.
#[derive(Debug, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
    pub fix: String,
}

fn problem(what: impl Into<String>, fix: impl Into<String>) -> Problem {
    Problem { what: what.into(), fix: fix.into() }
}

/// What the check reads from the leader.
pub struct Cluster {
    pub info: ClusterView,
    pub nodes: Vec<NodeView>,
    pub networks: Vec<NetworkView>,
    /// Each service and its endpoints as their nodes report them.
    pub services: Vec<(ServiceView, Vec<EndpointPsView>)>,
    /// The policy in force, if one was applied.
    pub policy: Option<::policy::Policy>,
    /// The roots, and a root rotation under way.
    pub ca: mesh_api::proto::pb::CaStatusResponse,
}

/// A root this close to its expiry is due for a rotation.
const ROOT_LEFT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A certificate this close to its expiry (of the cluster's lifetime) has missed its renewal,
/// which comes between 50 % and 80 % of it.
const CERT_LEFT: f64 = 0.15;

/// Every problem of `c` at `now`.
pub fn diagnose(c: &Cluster, now: OffsetDateTime) -> Vec<Problem> {
    let mut out = Vec::new();
    let active: Vec<&NodeView> = c.nodes.iter().filter(|n| n.state == NodeState::Active).collect();

    // Managers and quorum.
    let managers: Vec<&&NodeView> = active.iter().filter(|n| n.manager_status.is_some()).collect();
    let status = |n: &NodeView| n.manager_status.clone().unwrap_or_default();
    let voters: Vec<&&&NodeView> = managers.iter().filter(|n| !status(n).contains("non-voter")).collect();
    let up = voters.iter().filter(|n| !status(n).starts_with("unreachable")).count();
    if !managers.iter().any(|n| status(n).starts_with("leader")) {
        out.push(problem(
            "no manager leads",
            "start the managers (mesh-control run); a majority of the voters must be up",
        ));
    }
    for m in managers.iter().filter(|n| status(n).starts_with("unreachable")) {
        out.push(problem(
            format!("manager {} ({}) is unreachable", m.hostname, m.id),
            format!("start mesh-control on {} (meshctl unlock --state-dir DIR if autolocked), or remove it: meshctl node demote {} && meshctl node rm {}", m.hostname, m.id, m.id),
        ));
    }
    if !voters.is_empty() && up * 2 <= voters.len() {
        out.push(problem(
            format!(
                "{up} of {} voting managers answer: no majority, the cluster cannot change",
                voters.len()
            ),
            "bring the unreachable managers back",
        ));
    } else if voters.len() > 1 && (up - 1) * 2 <= voters.len() {
        out.push(problem(
            format!("{up} of {} voting managers answer: losing one more stops the cluster", voters.len()),
            "bring the unreachable managers back, or add one: meshctl join-token manager",
        ));
    }

    // The root CA: a rotation under way, and who holds it up; a root close to its end.
    if c.ca.rotating {
        let since = OffsetDateTime::from_unix_timestamp(c.ca.started_at).ok();
        let since = since.map_or_else(|| "-".to_owned(), |t| ago(now, t));
        for late in &c.ca.late {
            if late.offline {
                out.push(problem(
                    format!("node {} ({}) is down through the root CA rotation (started {since}): its certificate is the old root's", late.hostname, late.id),
                    format!("remove it and join it again: meshctl node rm {} && meshctl join-token worker", late.id),
                ));
            } else {
                out.push(problem(
                    format!("node {} ({}) has not renewed from the new root yet (rotation started {since}); the rotation waits for it", late.hostname, late.id),
                    format!("look at meshd on {} (meshd status), or remove it: meshctl node rm {}", late.hostname, late.id),
                ));
            }
        }
    }
    if !c.ca.external_error.is_empty() {
        let at = OffsetDateTime::from_unix_timestamp(c.ca.external_error_at)
            .map_or_else(|_| "-".to_owned(), |t| ago(now, t));
        out.push(problem(
            format!("the external CA at {} failed its last request ({at}): {}", c.ca.external, c.ca.external_error),
            "check that cfssl serve runs and that the managers reach it, with the auth key and the profiles node, workload and admin (mesh-control init --help)",
        ));
    }
    if let Some(root) = c.ca.roots.first()
        && let Ok(expires) = OffsetDateTime::from_unix_timestamp(root.not_after)
        && expires - now < ROOT_LEFT
    {
        out.push(problem(
            format!("the root CA {} expires in {}", root.digest, span((expires - now).as_seconds_f64())),
            "rotate it: meshctl cluster ca --rotate",
        ));
    }

    // Nodes: down, and certificates close to expiry.
    let lifetime = c.info.cert_expiry.as_secs_f64();
    for n in &active {
        if n.manager_status.is_none() && !n.connected {
            let since = n.last_seen.map_or("never seen".to_owned(), |t| format!("last seen {}", ago(now, t)));
            out.push(problem(
                format!("node {} ({}) has no session ({since})", n.hostname, n.id),
                format!("start meshd on {} (meshd run), or remove it: meshctl node rm {}", n.hostname, n.id),
            ));
        }
        if let Some(expiry) = n.cert_not_after {
            let left = (expiry - now).as_seconds_f64();
            if left <= 0.0 {
                out.push(problem(
                    format!("the certificate of {} ({}) expired {}", n.hostname, n.id, ago(now, expiry)),
                    format!("join {} again (meshd join, with a new token)", n.hostname),
                ));
            } else if left < lifetime * CERT_LEFT {
                out.push(problem(
                    format!(
                        "the certificate of {} ({}) expires in {} and was not renewed",
                        n.hostname,
                        n.id,
                        span(left)
                    ),
                    format!("on {}: meshd renew (or mesh-control's own renewal for a manager)", n.hostname),
                ));
            }
        }
    }

    // Services: endpoints not running, updates paused.
    for (s, endpoints) in &c.services {
        if (s.endpoints.len() as u32) < s.replicas {
            out.push(problem(
                format!("service {}: {} of {} endpoints placed", s.name, s.endpoints.len(), s.replicas),
                format!(
                    "add nodes that meet its constraints, or: meshctl service scale {} {}",
                    s.name,
                    s.endpoints.len()
                ),
            ));
        }
        for e in endpoints.iter().filter(|e| !matches!(e.state.as_str(), "running" | "ready" | "starting")) {
            let why = e.last_exit.as_deref().map(|w| format!(": {w}")).unwrap_or_default();
            out.push(problem(
                format!("endpoint {}.{} on {} is {}{why}", s.name, e.slot, e.hostname, e.state),
                format!("meshctl service logs {} --tail 50; meshctl service ps {}", s.name, s.name),
            ));
        }
        if let Some(r) = s.rollout.as_ref().filter(|r| r.state == "paused") {
            out.push(problem(
                format!(
                    "service {}: the update to version {} paused: {}",
                    s.name,
                    s.version,
                    r.message.clone().unwrap_or_default()
                ),
                format!(
                    "fix it and meshctl service update {} (resumes), or meshctl service rollback {}",
                    s.name, s.name
                ),
            ));
        }
    }

    // Network keys: rotation overdue (a rotation is due every `key_rotation`; the leader turns
    // them within seconds).
    let rotation = c.info.key_rotation;
    for n in c.networks.iter().filter(|n| n.encrypted) {
        if let Some(at) = n.rotated_at
            && (now - at).as_seconds_f64() > rotation.as_secs_f64() + Duration::from_secs(300).as_secs_f64()
        {
            out.push(problem(
                format!(
                    "network {}: its key was last rotated {} (every {} is due)",
                    n.name,
                    ago(now, at),
                    span(rotation.as_secs_f64())
                ),
                format!("meshctl network rotate-key {}", n.name),
            ));
        }
    }

    // Policy rules that never match anything.
    if let Some(policy) = &c.policy {
        let declared: BTreeMap<&str, Vec<(u16, &str)>> = c
            .services
            .iter()
            .map(|(s, _)| {
                let ports = s
                    .ports
                    .iter()
                    .filter_map(|p| {
                        let (port, protocol) = p.split_once('/')?;
                        Some((port.parse().ok()?, protocol))
                    })
                    .collect();
                (s.name.as_str(), ports)
            })
            .collect();
        for rule in &policy.rules {
            for to in &rule.to {
                let Some(ports) = declared.get(to.as_str()) else { continue };
                let wanted: Vec<u16> = if rule.ports.is_empty() {
                    ports.iter().map(|(p, _)| *p).collect()
                } else {
                    rule.ports.iter().copied().collect()
                };
                for port in &wanted {
                    match ports.iter().find(|(p, _)| p == port) {
                        None => out.push(problem(
                            format!(
                                "rule `{}` (line {}) names port {port} of {to}, which {to} does not declare",
                                rule.name, rule.line
                            ),
                            format!("fix the rule, or: meshctl service update {to} --port-add {port}/http"),
                        )),
                        Some((_, declared)) => {
                            let http = rule.protocol == ::policy::Protocol::Http;
                            if http
                                && *declared != "http"
                                && (!rule.methods.is_empty()
                                    || !rule.paths.is_empty()
                                    || !rule.headers.is_empty())
                            {
                                out.push(problem(
                                    format!("rule `{}` (line {}) decides HTTP requests on {to}:{port}, declared {declared}: the mesh never reads requests there, the rule never matches", rule.name, rule.line),
                                    format!("meshctl service update {to} --port-rm {port}/{declared} --port-add {port}/http, or give the rule protocol = \"tcp\""),
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    out
}

fn span(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
}

fn ago(now: OffsetDateTime, t: OffsetDateTime) -> String {
    format!("{} ago", span((now - t).as_seconds_f64()))
}

/// Reads the cluster from the leader.
pub async fn read(client: &mut AdminClient) -> anyhow::Result<Cluster> {
    let info = client.inspect_cluster().await?;
    let nodes = client.list_nodes().await?;
    let networks = client.list_networks().await?;
    let mut services = Vec::new();
    for s in client.list_services().await? {
        let ps = client.service_ps(&s.name).await?;
        services.push((s, ps));
    }
    let policy = match client.get_policy(None).await {
        Ok(p) => Some(::policy::Policy::parse(&p.file, &p.text)?),
        Err(e) if e.to_string().contains("no policy has been applied") => None,
        Err(e) => return Err(e.into()),
    };
    let ca = client.ca_status().await?;
    Ok(Cluster { info, nodes, networks, services, policy, ca })
}

/// `meshctl check`: prints each problem with its fix; an error (exit status 1) when there is one.
pub async fn run(client: &mut AdminClient) -> anyhow::Result<()> {
    let cluster = read(client).await?;
    let problems = diagnose(&cluster, OffsetDateTime::now_utc());
    if problems.is_empty() {
        println!(
            "ok: {} node(s), {} network(s), {} service(s), nothing to fix",
            cluster.nodes.iter().filter(|n| n.state == NodeState::Active).count(),
            cluster.networks.len(),
            cluster.services.len()
        );
        return Ok(());
    }
    for p in &problems {
        println!("problem: {}\n    fix: {}", p.what, p.fix);
    }
    anyhow::bail!("{} problem(s) found", problems.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_api::tokens::Role;

    fn node(name: &str, manager: Option<&str>, connected: bool, now: OffsetDateTime) -> NodeView {
        NodeView {
            id: mesh_api::ids::NodeId::random(),
            hostname: name.into(),
            role: if manager.is_some() { Role::Manager } else { Role::Worker },
            state: NodeState::Active,
            cert_not_after: Some(now + time::Duration::hours(20)),
            joined_at: None,
            last_seen: None,
            connected,
            labels: vec![],
            manager_status: manager.map(str::to_owned),
            control: None,
        }
    }

    fn service(name: &str, ports: &[&str]) -> ServiceView {
        ServiceView {
            name: name.into(),
            networks: vec!["front".into()],
            ports: ports.iter().map(|p| p.to_string()).collect(),
            publish: vec![],
            publish_nodes: vec![],
            replicas: 0,
            constraints: vec![],
            command: None,
            run: Default::default(),
            vips: Default::default(),
            endpoints: vec![],
            running: 0,
            version: 0,
            previous: None,
            rollout: None,
            signed: false,
            spec: None,
        }
    }

    fn cluster(nodes: Vec<NodeView>, policy: Option<&str>) -> Cluster {
        let info = ClusterView {
            id: mesh_api::ids::ClusterId::random(),
            autolock: false,
            cert_expiry: Duration::from_secs(24 * 3600),
            key_rotation: Duration::from_secs(12 * 3600),
            workload_cert_expiry: Duration::from_secs(3600),
            down_after: Duration::from_secs(15),
            managers: vec![],
            version: String::new(),
        };
        let services = vec![(service("api", &["80/tcp", "443/http"]), vec![]), (service("web", &[]), vec![])];
        let policy = policy.map(|text| ::policy::Policy::parse("p.toml", text).unwrap());
        let ca = mesh_api::proto::pb::CaStatusResponse {
            roots: vec![mesh_api::proto::pb::CaRoot {
                digest: "root".into(),
                subject: "CN=mesh root CA".into(),
                not_after: (OffsetDateTime::now_utc() + time::Duration::days(3650)).unix_timestamp(),
            }],
            ..Default::default()
        };
        Cluster { info, nodes, networks: vec![], services, policy, ca }
    }

    #[test]
    fn a_rotation_held_up_and_a_root_near_its_end_are_named() {
        let now = OffsetDateTime::now_utc();
        let nodes = vec![node("m1", Some("leader"), false, now), node("h2", None, true, now)];
        let mut c = cluster(nodes, None);
        c.ca.rotating = true;
        c.ca.started_at = (now - time::Duration::minutes(5)).unix_timestamp();
        let late = |id: &str, offline| mesh_api::proto::pb::CaLateNode {
            id: id.into(),
            hostname: format!("host-{id}"),
            role: 0,
            offline,
        };
        c.ca.late = vec![late("n1", false), late("n2", true)];
        let problems = diagnose(&c, now);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].what.contains("has not renewed from the new root") && problems[0].what.contains("5m")
        );
        assert!(problems[0].fix.contains("meshctl node rm n1"));
        assert!(problems[1].what.contains("down through the root CA rotation"));
        assert!(problems[1].fix.contains("meshctl node rm n2 && meshctl join-token worker"));
        c.ca.rotating = false;
        c.ca.late.clear();
        c.ca.roots[0].not_after = (now + time::Duration::days(100)).unix_timestamp();
        let problems = diagnose(&c, now);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].what.contains("expires in") && problems[0].fix.contains("cluster ca --rotate"));
    }

    #[test]
    fn an_external_ca_whose_last_request_failed_is_named() {
        let now = OffsetDateTime::now_utc();
        let nodes = vec![node("m1", Some("leader"), false, now), node("h2", None, true, now)];
        let mut c = cluster(nodes, None);
        c.ca.external = "http://10.0.0.5:8888".into();
        assert_eq!(diagnose(&c, now), [], "a signer that answered is no problem");
        c.ca.external_error = "the external CA at http://10.0.0.5:8888 cannot be reached".into();
        c.ca.external_error_at = (now - time::Duration::minutes(2)).unix_timestamp();
        let problems = diagnose(&c, now);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].what.contains("10.0.0.5:8888 failed its last request")
                && problems[0].what.contains("2m")
        );
        assert!(problems[0].fix.contains("cfssl serve"));
    }

    #[test]
    fn a_healthy_cluster_has_nothing_to_fix() {
        let now = OffsetDateTime::now_utc();
        let nodes = vec![node("m1", Some("leader"), false, now), node("h2", None, true, now)];
        assert_eq!(diagnose(&cluster(nodes, None), now), []);
    }

    #[test]
    fn managers_nodes_and_certificates_that_need_an_operator_are_named_with_a_fix() {
        let now = OffsetDateTime::now_utc();
        let mut late = node("h3", None, true, now);
        late.cert_not_after = Some(now + time::Duration::hours(1));
        let nodes = vec![
            node("m1", Some("leader"), false, now),
            node("m2", Some("unreachable"), false, now),
            node("m3", Some("reachable"), false, now),
            node("h2", None, false, now),
            late,
        ];
        let problems = diagnose(&cluster(nodes, None), now);
        let text = format!("{problems:?}");
        assert!(text.contains("manager m2") && text.contains("meshctl node demote"), "{text}");
        assert!(text.contains("losing one more stops the cluster"), "{text}");
        assert!(text.contains("node h2") && text.contains("meshd run"), "{text}");
        assert!(text.contains("certificate of h3") && text.contains("meshd renew"), "{text}");
        assert_eq!(problems.len(), 4);
        let leaderless =
            vec![node("m1", Some("unreachable"), false, now), node("m2", Some("unreachable"), false, now)];
        let text = format!("{:?}", diagnose(&cluster(leaderless, None), now));
        assert!(text.contains("no manager leads") && text.contains("no majority"), "{text}");
    }

    #[test]
    fn rules_that_can_never_match_are_named() {
        let now = OffsetDateTime::now_utc();
        let policy = r#"
default = "deny"

[[rule]]
name = "reads"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["GET"]

[[rule]]
name = "tls"
action = "allow"
from = ["web"]
to = ["api"]
ports = [443, 8443]
"#;
        let problems = diagnose(&cluster(vec![node("m1", Some("leader"), false, now)], Some(policy)), now);
        let text = format!("{problems:?}");
        assert!(text.contains("rule `reads`") && text.contains("declared tcp"), "{text}");
        assert!(text.contains("rule `tls`") && text.contains("port 8443"), "{text}");
        assert_eq!(problems.len(), 2, "{text}");
    }
}
