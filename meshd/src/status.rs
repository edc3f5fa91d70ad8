//! What the node holds, for `meshd status`: served by the running agent on a Unix socket in its
//! state directory (mode 0700, so only its owner can ask). Key epochs only, never key bytes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mesh_api::slice::NodeSlice;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

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
    pub counters: Option<std::sync::Arc<tun::core::Counters>>,
    /// Each endpoint's workload certificate: `service.slot until <expiry>`.
    #[serde(default)]
    pub workload_certificates: Vec<String>,
    #[serde(skip)]
    pub certificates: Option<crate::dataplane::Certificates>,
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
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkStatus {
    pub name: String,
    pub id: u32,
    pub subnet: String,
    pub encrypted: bool,
    /// use:epoch, e.g. `current:4`
    pub keys: Vec<String>,
    /// address -> node (underlay)
    pub peers: Vec<String>,
    /// name vip -> endpoints
    pub services: Vec<String>,
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
                keys: n
                    .epochs()
                    .iter()
                    .map(|(u, e)| format!("{}:{e}", format!("{u:?}").to_lowercase()))
                    .collect(),
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
        out.push_str(&format!("endpoints ({})\n", self.endpoints.len()));
        for e in &self.endpoints {
            out.push_str(&format!("  {}.{}  {}\n", e.service, e.slot, e.addresses.join(" ")));
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
        out.push_str(&format!("networks ({})\n", self.networks.len()));
        for n in &self.networks {
            let keys = if n.encrypted { n.keys.join(" ") } else { "unencrypted".to_owned() };
            out.push_str(&format!("  {} (ID {}, {})  keys: {}\n", n.name, n.id, n.subnet, keys));
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

/// Answers every connection on the socket with the current status as JSON.
pub async fn serve(state_dir: &Path, status: Arc<Mutex<Status>>) -> std::io::Result<()> {
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    loop {
        let (mut conn, _) = listener.accept().await?;
        let json = {
            let mut s = status.lock().expect("lock");
            if let Some(certs) = s.certificates.clone() {
                s.workload_certificates = certs
                    .lock()
                    .expect("lock")
                    .iter()
                    .map(|(k, c)| format!("{k} until {}", c.not_after))
                    .collect();
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
            serde_json::to_vec(&*s).expect("status serializes")
        };
        tokio::spawn(async move {
            if let Err(e) = conn.write_all(&json).await {
                warn!(error = %e, "status request failed");
            }
        });
    }
}

/// Asks a running agent for its status.
pub async fn query(state_dir: &Path) -> Result<Status, String> {
    let path = socket_path(state_dir);
    let mut conn = UnixStream::connect(&path)
        .await
        .map_err(|e| format!("cannot reach meshd at {} ({e}); is `meshd run` running?", path.display()))?;
    let mut json = Vec::new();
    conn.read_to_end(&mut json).await.map_err(|e| e.to_string())?;
    serde_json::from_slice(&json).map_err(|e| format!("malformed status from meshd: {e}"))
}
