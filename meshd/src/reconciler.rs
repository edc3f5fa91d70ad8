//! The reconciler: brings the node in line with each slice control sends, by fanning it out to
//! the parts in order —
//!
//! 1. the overlay's tables (networks, keys, peers);
//! 2. the workloads: namespaces made for new endpoints and removed for gone ones, their workload
//!    certificates kept or let go;
//! 3. each workload's DNS zone (the services of its networks, or those the policy lets it reach);
//! 4. the mesh's view (policy, routes, local endpoints), which the overlay's filter asks too;
//! 5. each workload's interception of its connections to services.
//!
//! It decides nothing about packets, requests or certificates itself: each part does its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use mesh_api::model::RunState;
use mesh_api::slice::{LocalEndpoint, NodeSlice};
use mesh_api::specs::{self, PinnedKey, Seen, SpecDocument};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::dns::{DnsUpstream, External, Upstream, Visibility, Zone};
use crate::endpoints::Endpoints;
use crate::identity::WorkloadCertificates;
use crate::mesh::outbound::Service;
use crate::mesh::{LocalTarget, Mesh, View};
use crate::netns;
use crate::overlay::{self, Overlay};
use crate::sandbox::Host;
use crate::workload::{Spec, Workload};

/// The parts a slice is fanned out to, and the workloads it made.
pub struct Reconciler {
    /// Prefix of the workload namespaces.
    prefix: String,
    overlay: Overlay,
    mesh: Arc<Mesh>,
    certificates: Arc<WorkloadCertificates>,
    upstream: Arc<Upstream>,
    visibility: Visibility,
    /// What confines the workloads' commands on this host.
    sandbox: Arc<Host>,
    /// What the workloads report of themselves.
    endpoints: Arc<Endpoints>,
    /// The operator's spec-signing key, when the node pinned one: only what it signed for this
    /// cluster runs.
    spec_key: Option<PinnedKey>,
    /// What bounds replays of what the key signed.
    spec_seen: std::sync::Mutex<Seen>,
    cluster: String,
    wireguard: Arc<crate::wireguard::Keys>,
    /// The ports this node publishes.
    ingress: Arc<crate::mesh::ingress::Ingress>,
    /// Which names outside the mesh the workloads' DNS looks up.
    dns_upstream: DnsUpstream,
    /// Namespace -> its workload.
    workloads: Mutex<HashMap<String, Workload>>,
}

/// What this host gives every workload besides its network: names, confinement, reporting.
pub struct Hosting {
    /// Where names outside the mesh are resolved.
    pub upstream: Arc<Upstream>,
    pub visibility: Visibility,
    pub sandbox: Arc<Host>,
    pub endpoints: Arc<Endpoints>,
    /// The spec-signing key the node pinned at join, the newest spec of each service it
    /// admitted, and the node's cluster.
    pub spec_key: Option<PinnedKey>,
    pub spec_seen: Seen,
    pub cluster: String,
    /// The node's WireGuard keys, which the session makes as the slices ask.
    pub wireguard: Arc<crate::wireguard::Keys>,
    /// The ports this node publishes, as the slices list them.
    pub ingress: Arc<crate::mesh::ingress::Ingress>,
    /// Which names outside the mesh the workloads' DNS looks up.
    pub dns_upstream: DnsUpstream,
}

impl Reconciler {
    /// A reconciler for workloads in namespaces named `prefix-…`. Namespaces under that prefix
    /// left by an earlier run are removed; what is wanted is rebuilt from the first slice.
    pub async fn start(
        prefix: &str,
        overlay: Overlay,
        mesh: Arc<Mesh>,
        certificates: Arc<WorkloadCertificates>,
        hosting: Hosting,
    ) -> Reconciler {
        let Hosting {
            upstream,
            visibility,
            sandbox,
            endpoints,
            spec_key,
            spec_seen,
            cluster,
            wireguard,
            ingress,
            dns_upstream,
        } = hosting;
        for ns in netns::list(prefix).await.unwrap_or_default() {
            info!(namespace = %ns, "removing a namespace left by an earlier run");
            let _ = netns::delete(&ns).await;
        }
        Reconciler {
            prefix: prefix.to_owned(),
            overlay,
            mesh,
            certificates,
            upstream,
            visibility,
            sandbox,
            endpoints,
            spec_key,
            spec_seen: std::sync::Mutex::new(spec_seen),
            cluster,
            wireguard,
            ingress,
            dns_upstream,
            workloads: Mutex::new(HashMap::new()),
        }
    }

    /// Brings the overlay, the workloads, their names and the mesh in line with `slice`.
    pub async fn apply(&self, slice: &NodeSlice) {
        self.overlay.configure(&overlay::config(slice, &self.wireguard));
        let mut workloads = self.workloads.lock().await;
        let wanted: HashMap<String, &LocalEndpoint> =
            slice.endpoints.iter().map(|e| (netns::namespace(&self.prefix, &e.service, e.slot), e)).collect();
        let stale: Vec<String> = workloads.keys().filter(|ns| !wanted.contains_key(*ns)).cloned().collect();
        let wanted_endpoints: HashSet<String> =
            wanted.values().map(|e| format!("{}.{}", e.service, e.slot)).collect();
        self.certificates.retain(|endpoint| wanted_endpoints.contains(endpoint));
        self.endpoints.retain(|service, slot| wanted_endpoints.contains(&format!("{service}.{slot}")));
        for ns in stale {
            if let Some(w) = workloads.remove(&ns)
                && let Err(e) = w.remove().await
            {
                warn!(namespace = %ns, error = %e, "removing a workload namespace failed");
            }
            info!(namespace = %ns, "workload removed");
        }
        // Each service's newest signed spec first: admitting it decides which older ones may
        // still run, in this slice and among the workloads running already.
        let mut wanted: Vec<(String, &LocalEndpoint)> = wanted.into_iter().collect();
        wanted.sort_by_cached_key(|(ns, e)| {
            let signed_at = e.signed.as_ref().and_then(|s| s.read().ok()).map_or(i64::MIN, |d| d.signed_at);
            (e.service.clone(), std::cmp::Reverse(signed_at), ns.clone())
        });
        for (ns, endpoint) in wanted {
            let mut addresses: Vec<(u32, Ipv4Addr, u8)> = Vec::new();
            for (name, address) in &endpoint.addresses {
                if let Some(n) = slice.networks.iter().find(|n| &n.name == name) {
                    addresses.push((n.id, *address, n.subnet.prefix_len()));
                }
            }
            addresses.sort();
            // With a pinned key, nothing runs that the operator did not sign as sent (and what
            // ran before under this endpoint stops: its spec is no longer what is asked), nor
            // what a later signed spec of the service replaced (a running one stops too).
            let verified = match &self.spec_key {
                Some(key) if endpoint.command.is_some() => {
                    specs::verify_endpoint(key, &self.cluster, endpoint).map(Some)
                }
                _ => Ok(None),
            };
            let admitted = match verified {
                Ok(Some(document)) => self.admit(endpoint, &document),
                Ok(None) => Ok(()),
                Err(refused) => Err(refused),
            };
            if let Err((state, why)) = admitted {
                self.refuse(&mut workloads, &ns, endpoint, state, why).await;
                continue;
            }
            if let Some(existing) = workloads.get(&ns) {
                if existing.runs(endpoint, &addresses) {
                    continue;
                }
                // Rebuilt on its new addresses or definition (a rolling update): the old one
                // stops first, and starting the new one replaces the namespace.
                info!(namespace = %ns, version = endpoint.version, "workload changed: rebuilding it");
                if let Some(old) = workloads.remove(&ns)
                    && let Err(e) = old.remove().await
                {
                    warn!(namespace = %ns, error = %e, "removing a workload namespace failed");
                }
            }
            let spec = Spec {
                service: endpoint.service.clone(),
                slot: endpoint.slot,
                version: endpoint.version,
                command: endpoint.command.clone(),
                run: endpoint.run.clone(),
                secrets: endpoint.secrets.clone(),
                addresses: addresses.clone(),
                networks: endpoint.addresses.keys().cloned().collect(),
            };
            let certificate = self.certificates.watch(&endpoint.service, endpoint.slot);
            match Workload::start(
                &ns,
                spec,
                &self.overlay,
                self.upstream.clone(),
                certificate,
                &self.sandbox,
                &self.endpoints,
            )
            .await
            {
                Ok(w) => {
                    info!(namespace = %ns, addresses = ?addresses, "workload ready");
                    workloads.insert(ns, w);
                }
                Err(e) => {
                    warn!(namespace = %ns, error = %e, "building the workload failed");
                    let failed = RunState::Failed;
                    self.endpoints.cannot_run(
                        &endpoint.service,
                        endpoint.slot,
                        endpoint.version,
                        failed,
                        e.to_string(),
                    );
                }
            }
        }
        // Every workload's names follow the slice at once; names outside the mesh are looked up
        // only where an egress rule could let the workload reach them (unless always).
        let engine = self.mesh.engine(slice);
        for w in workloads.values() {
            let visible = (self.visibility == Visibility::Policy).then(|| {
                let mut v = slice.visibility.get(&w.service).cloned().unwrap_or_default();
                v.insert(w.service.clone());
                v
            });
            let mut zone = Zone::visible_to(slice, &w.networks, visible.as_ref());
            zone.external = match self.dns_upstream {
                DnsUpstream::Always => External::Any,
                DnsUpstream::Policy => match engine.as_ref().map(|e| e.egress_reach(&w.service)) {
                    Some((_, true)) => External::Any,
                    Some((names, false)) => External::Only(names),
                    None => External::Only(Default::default()),
                },
            };
            w.zone.store(Arc::new(zone));
        }
        self.apply_mesh(slice, &mut workloads).await;
    }

    /// Whether a workload may start from `document` (verified): no older than the newest spec of
    /// its service admitted here, or the one that rolls back to.
    fn admit(&self, endpoint: &LocalEndpoint, document: &SpecDocument) -> Result<(), (RunState, String)> {
        let signed = endpoint.signed.as_ref().expect("a verified endpoint is signed");
        let mut seen = self.spec_seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.admit(signed, document).map_err(|e| match e {
            specs::SpecError::Replayed { .. } => (RunState::Replayed, e.to_string()),
            specs::SpecError::File(_) => (RunState::Failed, format!("cannot record the spec as seen: {e}")),
            _ => (RunState::BadSignature, e.to_string()),
        })
    }

    /// Does not run `endpoint` (its workload, if one ran, stops) and reports why.
    async fn refuse(
        &self,
        workloads: &mut HashMap<String, Workload>,
        ns: &str,
        endpoint: &LocalEndpoint,
        state: RunState,
        why: String,
    ) {
        if let Some(old) = workloads.remove(ns)
            && let Err(e) = old.remove().await
        {
            warn!(namespace = %ns, error = %e, "removing a workload namespace failed");
        }
        warn!(namespace = %ns, version = endpoint.version, reason = %why, "not running the workload: {}", state.name());
        self.endpoints.cannot_run(&endpoint.service, endpoint.slot, endpoint.version, state, why);
    }

    /// The mesh's view of `slice`, then each workload's interception: every (virtual IP, TCP
    /// port) of every service on its networks.
    async fn apply_mesh(&self, slice: &NodeSlice, workloads: &mut HashMap<String, Workload>) {
        let mut local = HashMap::new();
        for w in workloads.values() {
            let endpoint =
                slice.endpoints.iter().find(|e| format!("{}.{}", e.service, e.slot) == w.caller.endpoint);
            let ports = slice
                .networks
                .iter()
                .flat_map(|n| n.services.iter())
                .find(|r| r.name == w.service)
                .map(|r| r.ports.clone())
                .unwrap_or_default();
            for (network, address) in endpoint.iter().flat_map(|e| &e.addresses) {
                local.insert(
                    *address,
                    LocalTarget {
                        service: w.service.clone(),
                        network: network.clone(),
                        ports: ports.clone(),
                        netns: w.caller.netns.clone(),
                    },
                );
            }
        }
        let engine = self.mesh.engine(slice);
        self.mesh.egress.want(engine.as_ref().map(|e| e.egress_names()).unwrap_or_default());
        self.mesh.view.store(Arc::new(View::build(slice, local, engine)));
        self.ingress.update(&slice.published);
        for w in workloads.values_mut() {
            let mut wanted = BTreeMap::new();
            for network in slice.networks.iter().filter(|n| w.networks.contains(&n.name)) {
                for record in network.services.iter() {
                    for port in record
                        .ports
                        .iter()
                        .filter(|p| p.protocol.transport() == mesh_api::model::Protocol::Tcp)
                    {
                        wanted.insert(
                            SocketAddrV4::new(record.vip, port.port),
                            Service { network: network.name.clone(), name: record.name.clone() },
                        );
                    }
                }
            }
            let subnets: Vec<ipnet::Ipv4Net> =
                slice.networks.iter().filter(|n| w.networks.contains(&n.name)).map(|n| n.subnet).collect();
            if let Err(e) = w.interception.update(&self.mesh, &w.caller, wanted, subnets).await {
                warn!(endpoint = %w.caller.endpoint, error = %e, "cannot intercept the workload's connections to services");
            }
        }
    }

    /// Removes every workload (at shutdown).
    pub async fn shutdown(&self) {
        let mut workloads = self.workloads.lock().await;
        for (ns, w) in workloads.drain() {
            if let Err(e) = w.remove().await {
                warn!(namespace = %ns, error = %e, "removing a workload namespace failed");
            }
        }
    }
}
