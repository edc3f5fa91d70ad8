//! What the node holds, for `meshd status`, and the running agent's door for `meshd renew`: both
//! served on a Unix socket in the state directory (mode 0700, so only its owner can ask). Key
//! epochs only, never key bytes.
//!
//! A client writes one request (`status`, or `renew`) and closes its side; the agent answers in
//! JSON and closes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_api::slice::NodeSlice;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tracing::warn;

use crate::identity::{RenewNow, WorkloadCertificates};

/// Longest a client may take to ask, and the agent to answer (a renewal included).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request read.
const MAX_REQUEST: u64 = 64;

/// Where the agent answers status requests.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("meshd.sock")
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub control: String,
    pub underlay: String,
    pub connected: bool,
    pub last_error: Option<String>,
    /// The digests of the roots this node trusts, the signing one first (two during a root
    /// rotation).
    #[serde(default)]
    pub roots: Vec<String>,
    pub version: u64,
    pub endpoints: Vec<EndpointStatus>,
    pub networks: Vec<NetworkStatus>,
    /// The policy version held and the names of the rules this node enforces.
    pub policy_version: Option<u64>,
    pub policy_rules: Vec<String>,
    /// Data plane packets: sent, received, and drops by reason (`reason=count`).
    pub packets_sent: u64,
    pub packets_received: u64,
    pub drops: Vec<String>,
    #[serde(skip)]
    pub counters: Option<Arc<tun::core::Counters>>,
    #[serde(skip)]
    pub overlay: Option<tun::io::StatusHandle>,
    /// Each endpoint's workload certificate: `service.slot until <expiry>`.
    #[serde(default)]
    pub workload_certificates: Vec<String>,
    #[serde(skip)]
    pub certificates: Option<Arc<WorkloadCertificates>>,
    /// What the endpoints report of themselves, read at each query.
    /// The latest slice, and the workloads' namespace prefix: what `meshd ping` plans from.
    #[serde(skip)]
    pub slice: Option<Arc<NodeSlice>>,
    #[serde(skip)]
    pub netns_prefix: String,
    /// The ports this node publishes, each listening or why not.
    #[serde(default)]
    pub published: Vec<crate::endpoints::Published>,
    #[serde(skip)]
    pub endpoints_hub: Option<Arc<crate::endpoints::Endpoints>>,
    #[serde(skip)]
    pub reports: Option<
        tokio::sync::watch::Receiver<
            std::collections::BTreeMap<(String, u32), mesh_api::model::EndpointState>,
        >,
    >,
}

impl PartialEq for Status {
    fn eq(&self, other: &Status) -> bool {
        serde_json::to_value(self).ok() == serde_json::to_value(other).ok()
    }
}

impl Eq for Status {}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointStatus {
    pub service: String,
    pub slot: u32,
    /// network=address
    pub addresses: Vec<String>,
    /// As reported to control (`running`, `unsigned`, `bad-signature`...), and why when it
    /// does not run.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub name: String,
    pub id: u32,
    pub subnet: String,
    pub encrypted: bool,
    /// `aes-gcm`, `wireguard` or `none`.
    #[serde(default)]
    pub transport: String,
    /// use:epoch, e.g. `current:4`; on a WireGuard network `generation:N`.
    pub keys: Vec<String>,
    /// On a WireGuard network: each peer node, as `wg show` would list it (never a private key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wireguard_peers: Vec<WireguardPeer>,
    /// address -> node (underlay)
    pub peers: Vec<String>,
    /// name vip -> endpoints
    pub services: Vec<String>,
}

/// A WireGuard peer as `meshd status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireguardPeer {
    pub node: String,
    /// Base64, as `wg` shows keys.
    pub public_key: String,
    /// Its underlay address.
    pub endpoint: Option<String>,
    /// Seconds since the last completed handshake; none before the first.
    pub latest_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

impl Status {
    /// Takes in a new slice.
    pub fn apply(&mut self, slice: &NodeSlice) {
        self.version = slice.version;
        self.policy_version = slice.policy.as_ref().map(|p| p.version);
        self.policy_rules = slice
            .policy
            .as_ref()
            .and_then(|p| policy::Policy::parse("slice", &p.text).ok())
            .map(|p| p.rules.into_iter().map(|r| r.name).collect())
            .unwrap_or_default();
        self.endpoints = slice
            .endpoints
            .iter()
            .map(|e| EndpointStatus {
                service: e.service.clone(),
                slot: e.slot,
                addresses: e.addresses.iter().map(|(n, a)| format!("{n}={a}")).collect(),
                state: None,
                reason: None,
            })
            .collect();
        self.networks = slice
            .networks
            .iter()
            .map(|n| NetworkStatus {
                name: n.name.clone(),
                id: n.id,
                subnet: n.subnet.to_string(),
                encrypted: n.encrypted,
                transport: match (n.encrypted, n.wireguard) {
                    (_, Some(_)) => "wireguard",
                    (true, None) => "aes-gcm",
                    (false, None) => "none",
                }
                .to_owned(),
                keys: match n.wireguard {
                    Some(generation) => vec![format!("generation:{generation}")],
                    None => n
                        .epochs()
                        .iter()
                        .map(|(u, e)| format!("{}:{e}", format!("{u:?}").to_lowercase()))
                        .collect(),
                },
                wireguard_peers: Vec::new(),
                peers: n
                    .peers
                    .iter()
                    .map(|p| {
                        let underlay = p.underlay.map_or("?".to_owned(), |u| u.to_string());
                        format!("{} -> {} ({underlay})", p.address, p.node)
                    })
                    .collect(),
                services: n
                    .services
                    .iter()
                    .map(|s| {
                        let eps: Vec<String> = s.endpoints.iter().map(|a| a.to_string()).collect();
                        format!("{} {} -> [{}]", s.name, s.vip, eps.join(", "))
                    })
                    .collect(),
            })
            .collect();
    }

    /// A human-readable report.
    pub fn render(&self) -> String {
        let mut out = format!(
            "node      {}\ncontrol   {} ({})\nunderlay  {}\nslice     version {}\n",
            self.node,
            self.control,
            if self.connected {
                "connected".to_owned()
            } else {
                format!("disconnected: {}", self.last_error.as_deref().unwrap_or("-"))
            },
            self.underlay,
            self.version
        );
        out.push_str(&format!("roots     {}\n", self.roots.join(", ")));
        out.push_str(&format!("endpoints ({})\n", self.endpoints.len()));
        for e in &self.endpoints {
            let state = match (&e.state, &e.reason) {
                (Some(state), Some(why)) if !matches!(state.as_str(), "running" | "ready") => {
                    format!("  {state}: {why}")
                }
                (Some(state), _) => format!("  {state}"),
                _ => String::new(),
            };
            out.push_str(&format!("  {}.{}  {}{state}\n", e.service, e.slot, e.addresses.join(" ")));
        }
        for c in &self.workload_certificates {
            out.push_str(&format!("  certificate {c}\n"));
        }
        match self.policy_version {
            Some(v) => out.push_str(&format!(
                "policy    version {v}, rules: {}\n",
                if self.policy_rules.is_empty() {
                    "none for this node".to_owned()
                } else {
                    self.policy_rules.join(", ")
                }
            )),
            None => out.push_str("policy    none applied (everything denied by default)\n"),
        }
        if self.counters.is_some() || self.packets_sent + self.packets_received > 0 || !self.drops.is_empty()
        {
            out.push_str(&format!(
                "packets   sent {}, received {}, dropped: {}\n",
                self.packets_sent,
                self.packets_received,
                if self.drops.is_empty() { "none".to_owned() } else { self.drops.join(" ") }
            ));
        }
        for p in &self.published {
            match &p.error {
                None => out.push_str(&format!("published {} -> {} listening\n", p.port, p.service)),
                Some(e) => {
                    out.push_str(&format!("published {} -> {} NOT LISTENING: {e}\n", p.port, p.service))
                }
            }
        }
        out.push_str(&format!("networks ({})\n", self.networks.len()));
        for n in &self.networks {
            let keys = if n.encrypted { n.keys.join(" ") } else { "unencrypted".to_owned() };
            out.push_str(&format!(
                "  {} (ID {}, {}, {})  keys: {}\n",
                n.name, n.id, n.subnet, n.transport, keys
            ));
            for w in &n.wireguard_peers {
                out.push_str(&format!(
                    "    wireguard {} key {} endpoint {} handshake {} rx {} tx {}\n",
                    w.node,
                    w.public_key,
                    w.endpoint.as_deref().unwrap_or("-"),
                    w.latest_handshake_secs.map_or("never".to_owned(), |s| format!("{s}s ago")),
                    w.rx_bytes,
                    w.tx_bytes
                ));
            }
            for p in &n.peers {
                out.push_str(&format!("    peer     {p}\n"));
            }
            for s in &n.services {
                out.push_str(&format!("    service  {s}\n"));
            }
        }
        out
    }
}

/// What the agent answers to `renew`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Renewal {
    /// The node certificate was renewed; it is valid until `not_after`.
    Renewed { node: String, not_after: String },
    /// Why it was not.
    Failed(String),
}

/// Answers every connection on the socket: the current status as JSON, or for `renew` the
/// outcome of a renewal made through `renew_now`.
pub async fn serve(state_dir: &Path, status: Arc<Mutex<Status>>, renew_now: RenewNow) -> std::io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    let mut backoff = mesh_api::accept::AcceptBackoff::default();
    loop {
        // An accept error (out of file descriptors, say) is waited out, never the end of meshd.
        let conn = match listener.accept().await {
            Ok((conn, _)) => {
                backoff.reset();
                conn
            }
            Err(e) => {
                backoff.wait("the status socket", &e).await;
                continue;
            }
        };
        let (status, renew_now) = (status.clone(), renew_now.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(ANSWER_TIMEOUT, answer(conn, &status, &renew_now)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %e, "status request failed"),
                Err(_) => warn!("status request timed out"),
            }
        });
    }
}

async fn answer(mut conn: UnixStream, status: &Mutex<Status>, renew_now: &RenewNow) -> std::io::Result<()> {
    let mut request = Vec::new();
    (&mut conn).take(MAX_REQUEST).read_to_end(&mut request).await?;
    let request = String::from_utf8_lossy(&request).trim().to_owned();
    let json = match request.as_str() {
        "renew" => serde_json::to_vec(&renew(renew_now).await),
        ping if ping.starts_with("ping ") => serde_json::to_vec(&echo(status, &ping["ping ".len()..]).await),
        _ => serde_json::to_vec(&snapshot(status)),
    }
    .expect("answers serialize");
    conn.write_all(&json).await
}

/// The status, with the counters and certificates read now.
/// `meshd ping TARGET`: three echoes along each path the latest slice gives.
async fn echo(status: &Mutex<Status>, target: &str) -> Result<Vec<crate::ping::Echo>, String> {
    let (slice, prefix) = {
        let s = status.lock().expect("lock");
        (s.slice.clone(), s.netns_prefix.clone())
    };
    let slice = slice.ok_or("no slice from control yet")?;
    let probes = crate::ping::plan(&slice, &prefix, target.trim())?;
    let mut echoes = Vec::new();
    for probe in probes {
        echoes.push(crate::ping::run(probe, 3).await);
    }
    Ok(echoes)
}

/// Asks the agent running on `state_dir` to ping `target`.
pub async fn ask_ping(state_dir: &Path, target: &str) -> Result<Vec<crate::ping::Echo>, String> {
    let answer = ask(state_dir, &format!("ping {target}")).await.map_err(|e| match e {
        AskError::Unreachable(e) => format!(
            "cannot reach meshd at {} ({e}); is `meshd run` running?",
            socket_path(state_dir).display()
        ),
        AskError::Failed(e) => e,
    })?;
    serde_json::from_slice::<Result<Vec<crate::ping::Echo>, String>>(&answer)
        .map_err(|e| format!("meshd answered something else: {e}"))?
}

fn snapshot(status: &Mutex<Status>) -> Status {
    let mut s = status.lock().expect("lock");
    if let Some(reports) = s.reports.clone() {
        let reports = reports.borrow();
        for e in &mut s.endpoints {
            let report = reports.get(&(e.service.clone(), e.slot));
            e.state = report.map(|r| r.state.name().to_owned());
            e.reason = report.and_then(|r| r.last_exit.clone());
        }
    }
    if let Some(hub) = s.endpoints_hub.clone() {
        s.published = hub.published();
    }
    if let Some(certs) = s.certificates.clone() {
        s.workload_certificates =
            certs.expiries().into_iter().map(|(k, not_after)| format!("{k} until {not_after}")).collect();
    }
    if let Some(c) = s.counters.clone() {
        use std::sync::atomic::Ordering::Relaxed;
        s.packets_sent = c.sent.load(Relaxed);
        s.packets_received = c.received.load(Relaxed);
        s.drops = c
            .all_drops()
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{}={n}", r.name()))
            .collect();
    }
    if let Some(overlay) = s.overlay.clone() {
        let peers = overlay.wireguard();
        let slice = s.slice.clone();
        let node_of = |network: u32, index: u32| {
            slice
                .as_ref()
                .and_then(|sl| sl.networks.iter().find(|n| n.id == network))
                .and_then(|n| n.peers.iter().find(|p| p.node_index == index))
                .map_or_else(|| format!("index {index}"), |p| p.node.to_string())
        };
        for n in &mut s.networks {
            n.wireguard_peers = peers
                .iter()
                .filter(|p| p.network == n.id)
                .map(|p| WireguardPeer {
                    node: node_of(p.network, p.node_index),
                    public_key: crate::wireguard::encode(&p.public),
                    endpoint: p.underlay.map(|u| u.to_string()),
                    latest_handshake_secs: p.last_handshake.map(|d| d.as_secs()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect();
        }
    }
    s.clone()
}

/// Asks the renewal loop to renew now and waits for the outcome.
async fn renew(renew_now: &RenewNow) -> Renewal {
    let (reply, outcome) = oneshot::channel();
    if renew_now.send(reply).await.is_err() {
        return Renewal::Failed("the agent no longer renews its certificate".into());
    }
    match outcome.await {
        Ok(Ok(node)) => {
            Renewal::Renewed { node: node.id.to_string(), not_after: node.info.not_after.to_string() }
        }
        Ok(Err(why)) => Renewal::Failed(why),
        Err(_) => Renewal::Failed("the agent stopped before the renewal finished".into()),
    }
}

/// Why a request to the agent got no answer.
enum AskError {
    /// No agent answers on the socket (the error says why).
    Unreachable(std::io::Error),
    Failed(String),
}

/// Sends `request` to the agent at `state_dir` and reads its answer.
async fn ask(state_dir: &Path, request: &str) -> Result<Vec<u8>, AskError> {
    let mut conn = UnixStream::connect(socket_path(state_dir)).await.map_err(AskError::Unreachable)?;
    let failed = |e: std::io::Error| AskError::Failed(e.to_string());
    conn.write_all(request.as_bytes()).await.map_err(failed)?;
    conn.shutdown().await.map_err(failed)?;
    let mut json = Vec::new();
    conn.read_to_end(&mut json).await.map_err(failed)?;
    if json.is_empty() {
        return Err(AskError::Failed(format!(
            "meshd closed the connection without answering (it answers within {} s)",
            ANSWER_TIMEOUT.as_secs()
        )));
    }
    Ok(json)
}

/// Asks a running agent for its status.
pub async fn query(state_dir: &Path) -> Result<Status, String> {
    let json = ask(state_dir, "status\n").await.map_err(|e| match e {
        AskError::Unreachable(e) => format!(
            "cannot reach meshd at {} ({e}); is `meshd run` running?",
            socket_path(state_dir).display()
        ),
        AskError::Failed(e) => e,
    })?;
    serde_json::from_slice(&json).map_err(|e| format!("malformed status from meshd: {e}"))
}

/// Asks a running agent to renew its node certificate now; `None` when no agent answers on
/// `state_dir` (the caller may then renew on disk itself).
pub async fn ask_renewal(state_dir: &Path) -> Result<Option<Renewal>, String> {
    let json = match ask(state_dir, "renew\n").await {
        Ok(json) => json,
        Err(AskError::Unreachable(_)) => return Ok(None),
        Err(AskError::Failed(e)) => return Err(e),
    };
    serde_json::from_slice(&json).map(Some).map_err(|e| format!("malformed answer from meshd: {e}"))
}

#[cfg(test)]
mod tests {
    use mesh_api::ids::NodeId;
    use mesh_api::pki::CertInfo;
    use mesh_api::tls::Identity;
    use time::OffsetDateTime;

    use super::*;
    use crate::identity::NodeIdentity;

    fn renewed() -> Arc<NodeIdentity> {
        let not_after = OffsetDateTime::now_utc() + time::Duration::days(1);
        Arc::new(NodeIdentity {
            id: NodeId::random(),
            info: CertInfo {
                common_name: String::new(),
                unit: "mesh-worker".into(),
                organization: String::new(),
                uris: vec![],
                serial: "01".into(),
                not_before: OffsetDateTime::now_utc(),
                not_after,
            },
            trust: crate::identity::test_roots(),
            identity: Identity { cert_pem: String::new(), key_pem: String::new() },
            managers: vec![],
            manager_ids: vec![],
            spec_key: None,
        })
    }

    #[tokio::test]
    async fn the_socket_answers_status_and_renewals_and_tells_when_no_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ask_renewal(dir.path()).await, Ok(None), "no agent: the caller renews itself");
        assert!(query(dir.path()).await.unwrap_err().contains("is `meshd run` running?"));
        let status = Arc::new(Mutex::new(Status { node: "n1".into(), ..Status::default() }));
        let (renew_now, mut requests) = tokio::sync::mpsc::channel(1);
        let path = dir.path().to_owned();
        let _serving = tokio::spawn(async move { serve(&path, status, renew_now).await });
        // The renewal loop's side: the first request succeeds, the next fails.
        let node = renewed();
        let answering = node.clone();
        tokio::spawn(async move {
            let mut outcomes = vec![Err("control is unreachable".to_owned()), Ok(answering)];
            while let Some(reply) = requests.recv().await {
                let _ = reply.send(outcomes.pop().expect("two requests"));
            }
        });
        for _ in 0..200 {
            if socket_path(dir.path()).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(query(dir.path()).await.unwrap().node, "n1");
        assert_eq!(
            ask_renewal(dir.path()).await,
            Ok(Some(Renewal::Renewed {
                node: node.id.to_string(),
                not_after: node.info.not_after.to_string()
            }))
        );
        assert_eq!(ask_renewal(dir.path()).await, Ok(Some(Renewal::Failed("control is unreachable".into()))));
    }
}
