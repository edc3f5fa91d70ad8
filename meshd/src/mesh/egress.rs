//! Egress: connections from workloads to destinations outside the mesh, allowed only by policy
//! rules naming them (`to = ["cidr:…"]`, `to = ["dns:…"]`).
//!
//! ```text
//!  workload (netns) ── connect(203.0.113.7:443) ──► nft redirect to 127.0.0.1:15002 ──► meshd
//!      default route via its tun device                 (every TCP connection not     decides: the
//!      (anything else: to meshd, dropped, counted)       to the mesh or loopback)      policy, the names' answers
//!                                                                                      ──► connect from the host
//! ```
//!
//! A workload's namespace routes everything it has no overlay route for to its tun device, so
//! nothing leaves the namespace except through meshd. Its TCP connections to addresses outside
//! its networks are redirected to meshd's listener there (the original destination names where
//! it was going); meshd decides with the workload's service, the address and the port, the
//! address counting for a `dns:` rule only while the name's current answers hold it, and, if
//! allowed, opens the connection from the host's own namespace (the host's address is the
//! source: a source NAT) and carries the bytes. Denied connections are closed and counted; other
//! packets to outside addresses reach the tun device, where the overlay drops and counts them
//! (`no_route`). Names are resolved here with the host's resolvers and again when their answers
//! expire, so a changed answer is followed. An open connection is decided again twice a second
//! and cut when no longer allowed. Some destinations never are, whatever a rule or a name's
//! answer says: this host's addresses, the cluster's nodes and managers, the mesh's subnets,
//! loopback, link-local (the clouds' metadata services), multicast and reserved addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mesh_api::accept::{Admission, Permit, Quota};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Mesh;
use super::outbound::Caller;
use crate::dns::Upstream;
use crate::metrics::{Direction, Verdict};

/// Where, inside each workload namespace, meshd takes the connections leaving the mesh.
pub const EGRESS_PORT: u16 = 15002;
/// A name's answers are asked for again after their TTL, but no sooner than this and no later.
const MIN_REFRESH: Duration = Duration::from_secs(2);
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// Longest wait for a connection to an outside destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections leaving the mesh that one workload may hold open at once.
const OPEN_PER_WORKLOAD: Quota = Quota { total: 1024, per_source: 1024 };
/// How often an open connection is decided again (a new policy, a name's new answers).
const RECHECK: Duration = Duration::from_millis(500);

/// The current answers of every name a `dns:` rule in force names (and this host's own
/// addresses, never a way out).
#[derive(Default)]
pub struct Names {
    answers: ArcSwap<BTreeMap<String, Vec<Ipv4Addr>>>,
    wanted: watch::Sender<BTreeSet<String>>,
    /// This host's addresses, and when they were read: again at most once a second.
    host: std::sync::Mutex<Option<(Instant, Vec<Ipv4Addr>)>>,
}

impl Names {
    /// Keeps `names` resolved from now on (and forgets the others).
    pub fn want(&self, names: BTreeSet<String>) {
        self.wanted.send_if_modified(|held| {
            let changed = *held != names;
            *held = names;
            changed
        });
    }

    /// The names whose current answers hold `address`.
    pub fn of(&self, address: Ipv4Addr) -> Vec<String> {
        self.answers.load().iter().filter(|(_, a)| a.contains(&address)).map(|(n, _)| n.clone()).collect()
    }

    /// Whether `address` is one of this host's (its namespace's interfaces'), as read within
    /// the last second.
    fn is_this_host(&self, address: Ipv4Addr) -> bool {
        let mut host = self.host.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if host.as_ref().is_none_or(|(read, _)| read.elapsed() >= Duration::from_secs(1)) {
            let addresses = nix::ifaddrs::getifaddrs()
                .map(|all| all.filter_map(|i| i.address?.as_sockaddr_in().map(|a| a.ip())).collect())
                .unwrap_or_default();
            *host = Some((Instant::now(), addresses));
        }
        host.as_ref().is_some_and(|(_, addresses)| addresses.contains(&address))
    }

    /// The current answers of `name`.
    pub fn answers(&self, name: &str) -> Vec<Ipv4Addr> {
        self.answers.load().get(name).cloned().unwrap_or_default()
    }

    /// Resolves every wanted name with `upstream`, and again when its answers expire; a name that
    /// cannot be resolved holds no address until it can. Until dropped.
    pub async fn keep_resolved(self: Arc<Names>, upstream: Arc<Upstream>) {
        let mut wanted = self.wanted.subscribe();
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let names = wanted.borrow_and_update().clone();
            due.retain(|n, _| names.contains(n));
            let now = Instant::now();
            let mut answers = (**self.answers.load()).clone();
            answers.retain(|n, _| names.contains(n));
            let expired: Vec<&String> =
                names.iter().filter(|n| due.get(*n).is_none_or(|at| *at <= now)).collect();
            for name in expired {
                let next = match upstream.resolve_v4(name).await {
                    Ok((addresses, valid_until)) => {
                        let was = answers.insert(name.clone(), addresses.clone());
                        if was.as_ref() != Some(&addresses) {
                            info!(%name, ?addresses, "egress name resolved");
                        }
                        valid_until.saturating_duration_since(now).clamp(MIN_REFRESH, MAX_REFRESH)
                    }
                    Err(e) => {
                        // Said once per name that fails, not every retry.
                        if answers.remove(name).is_some() || !due.contains_key(name) {
                            warn!(%name, error = %e, "egress name does not resolve: none of its addresses is allowed");
                        }
                        MIN_REFRESH
                    }
                };
                due.insert(name.clone(), now + next);
                // In force at once: an expired answer does not wait for the other names' lookups.
                self.answers.store(Arc::new(answers.clone()));
            }
            self.answers.store(Arc::new(answers));
            let soonest = due.values().min().copied().unwrap_or(now + MAX_REFRESH);
            tokio::select! {
                _ = tokio::time::sleep_until(soonest.into()) => {}
                changed = wanted.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// Takes a workload's connections leaving the mesh, until the task is aborted.
pub async fn accept(mesh: Arc<Mesh>, caller: Arc<Caller>, listener: TcpListener) {
    let mut backoff = mesh_api::accept::AcceptBackoff::default();
    let admission = Admission::new(OPEN_PER_WORKLOAD);
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                backoff.reset();
                let Some(permit) = admission.admit(from.ip()) else {
                    mesh_api::accept::refused("a workload holds too many connections leaving the mesh", from);
                    let labels = Verdict {
                        source: caller.service.clone(),
                        destination: "egress".to_owned(),
                        port: 0,
                        kind: "egress",
                        verdict: "deny",
                        rule: "over_quota".to_owned(),
                    };
                    mesh.metrics.verdicts.get_or_create(&labels).inc();
                    continue;
                };
                match super::outbound::original_destination(&stream) {
                    Ok(to) => {
                        tokio::spawn(forward(mesh.clone(), caller.clone(), to, stream, permit));
                    }
                    Err(e) => {
                        debug!(caller = %caller.endpoint, error = %e, "a connection without its destination; closed")
                    }
                }
            }
            Err(e) => backoff.wait("a workload's egress", &e).await,
        }
    }
}

/// Whether a connection from `caller` to `to` may leave the mesh now: `Ok` with the rule that
/// lets it, or `Err` with the rule (or `reserved`, `default`) and why not. A reserved destination
/// never may; else the policy decides, with the names whose current answers hold the address.
fn decide(mesh: &Mesh, caller: &Caller, to: SocketAddrV4) -> Result<String, (String, String)> {
    let view = mesh.view.load();
    let reserved = view
        .reserved(*to.ip())
        .or_else(|| mesh.egress.is_this_host(*to.ip()).then_some("an address of this host"));
    if let Some(why) = reserved {
        return Err(("reserved".to_owned(), format!("{to} is {why}: never a way out of the mesh")));
    }
    let names = mesh.egress.of(*to.ip());
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let request =
        policy::EgressRequest { from: &caller.service, address: *to.ip(), port: to.port(), names: &names };
    let decision = view.decide_egress(&request);
    let rule = decision.rule.as_ref().map_or_else(|| "default".to_owned(), |r| r.name.to_string());
    if decision.allowed() { Ok(rule) } else { Err((rule, decision.reason())) }
}

/// Decides on one connection to `to`; if allowed, opens it from the host and carries its bytes
/// for as long as it stays allowed (a new policy or a name's new answers cut it).
async fn forward(
    mesh: Arc<Mesh>,
    caller: Arc<Caller>,
    to: SocketAddrV4,
    mut stream: TcpStream,
    _permit: Permit,
) {
    let decided = decide(&mesh, &caller, to);
    let labels = Verdict {
        source: caller.service.clone(),
        destination: "egress".to_owned(),
        port: to.port(),
        kind: "egress",
        verdict: if decided.is_ok() { "allow" } else { "deny" },
        rule: match &decided {
            Ok(rule) | Err((rule, _)) => rule.clone(),
        },
    };
    mesh.metrics.verdicts.get_or_create(&labels).inc();
    if let Err((_, reason)) = decided {
        info!(caller = %caller.endpoint, destination = %to, %reason, "connection leaving the mesh denied");
        // Reset, not closed: the workload learns at once that nothing is there for it.
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        return;
    }
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(SocketAddr::V4(to))).await;
    let mut upstream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(caller = %caller.endpoint, destination = %to, error = %e, "an allowed destination outside the mesh did not answer");
            return;
        }
        Err(_) => {
            info!(caller = %caller.endpoint, destination = %to, "an allowed destination outside the mesh did not answer in time");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let until_refused = async {
        loop {
            tokio::time::sleep(RECHECK).await;
            if let Err((_, reason)) = decide(&mesh, &caller, to) {
                return reason;
            }
        }
    };
    tokio::select! {
        relayed = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => {
            if let Ok((up, down)) = relayed {
                mesh.metrics.bytes.get_or_create(&Direction { direction: "egress" }).inc_by(up + down);
            }
        }
        reason = until_refused => {
            warn!(caller = %caller.endpoint, destination = %to, %reason, "an open connection leaving the mesh is no longer allowed: cut");
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    }
}
