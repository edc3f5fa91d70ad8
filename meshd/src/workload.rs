//! One local endpoint's workload: its network namespace and what meshd runs for it there — an
//! overlay interface per network it is on, the DNS server answering for those networks, the
//! service's command, and the mesh's side of it (who it is, with its workload certificate as
//! identity publishes it, and the interception of its connections to services). Dropping a
//! [`Workload`] stops all of that; [`Workload::remove`] also removes the namespace.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::model::{RunSpec, RunState};
use mesh_api::slice::{LocalEndpoint, SecretFile};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::task::AbortOnDropHandle;
use tun::io::Interface;

use crate::dns::{Upstream, Zone};
use crate::endpoints::{Endpoint, Endpoints};
use crate::identity::WorkloadCertificate;
use crate::mesh::outbound::{Caller, Interception};
use crate::netns::{self, Netns};
use crate::overlay::Overlay;
use crate::sandbox::secrets::Secrets;
use crate::sandbox::{self, Host, UidLease};

/// What a workload is made of, from the endpoint in the slice.
pub struct Spec {
    pub service: String,
    pub slot: u32,
    /// The version of its service's definition (the command and how it runs) given to it.
    pub version: u64,
    /// The command its workloads run, if the service names one, and how it is confined.
    pub command: Option<String>,
    pub run: RunSpec,
    /// The secrets its command reads (those `run` names).
    pub secrets: Vec<SecretFile>,
    /// (network ID, address, subnet prefix length), one per network it is on, in order.
    pub addresses: Vec<(u32, Ipv4Addr, u8)>,
    /// The names of those networks: what its DNS answers for.
    pub networks: BTreeSet<String>,
}

/// One endpoint's namespace and what runs for it.
pub struct Workload {
    namespace: String,
    interfaces: Vec<Interface>,
    /// The networks it is on (by name) and the names its DNS server answers.
    pub networks: BTreeSet<String>,
    pub service: String,
    pub zone: Arc<ArcSwap<Zone>>,
    /// The mesh's side of the workload: who it is, and the interception of its connections to
    /// services.
    pub caller: Arc<Caller>,
    pub interception: Interception,
    _dns: AbortOnDropHandle<()>,
    _command: Option<AbortOnDropHandle<()>>,
    /// Unmounted after the command's task is dropped (which kills it).
    _secrets: Option<Secrets>,
    /// The report of an endpoint without a command (one with a command reports from its task).
    _ready: Option<Endpoint>,
    /// Its user, held while it lives (dropped after the command's task, which kills it; by
    /// [`Workload::remove`], after its namespace is gone).
    _uid: Option<UidLease>,
    /// The version it runs and that version's command, confinement and secrets (by name:
    /// a secret never changes under its name).
    definition: (u64, Option<String>, RunSpec),
}

impl Workload {
    /// Makes namespace `ns` (replacing a stale one), its DNS server, its interfaces on
    /// `overlay`, and starts the command confined as `host` and the spec say; `certificate` is
    /// its workload certificate as identity publishes it.
    pub async fn start(
        ns: &str,
        spec: Spec,
        overlay: &Overlay,
        upstream: Arc<Upstream>,
        certificate: WorkloadCertificate,
        host: &Arc<Host>,
        endpoints: &Arc<Endpoints>,
    ) -> std::io::Result<Workload> {
        let report = endpoints.endpoint(&spec.service, spec.slot, spec.version);
        let definition = (spec.version, spec.command.clone(), spec.run.clone());
        let uid = host.lease_uid()?;
        // Checked before anything is made: a service that cannot be confined does not start.
        let plan = match &spec.command {
            Some(command) => Some(host.plan(ns, command, &spec.run, &uid)?),
            None => None,
        };
        netns::create(ns).await?;
        let netns = Arc::new(Netns::enter(ns)?);
        let (udp, tcp) = netns::bind_dns(ns)?;
        let zone = Arc::new(ArcSwap::from_pointee(Zone::default()));
        let dns = tokio::spawn(crate::dns::serve(
            UdpSocket::from_std(udp)?,
            TcpListener::from_std(tcp)?,
            zone.clone(),
            upstream,
        ));
        let dns = AbortOnDropHandle::new(dns);
        let mut interfaces = Vec::new();
        for (i, (id, address, prefix_len)) in spec.addresses.iter().enumerate() {
            let device = netns::open_tun(ns, &format!("{}{i}", netns::INTERFACE), *address, *prefix_len)?;
            interfaces.push(overlay.attach(*id, *address, device)?);
        }
        if !interfaces.is_empty() {
            // Whatever has no overlay route goes to meshd too (TCP redirected to its egress
            // listener, the rest dropped and counted by the overlay): nothing leaves unseen.
            netns::default_route(ns, &format!("{}0", netns::INTERFACE)).await?;
        }
        let mut secrets = None;
        let mut ready = None;
        let command = match plan {
            Some(mut plan) => {
                plan.cgroups = sandbox::cgroup::create(ns, &spec.run)?;
                secrets = Secrets::mount(ns, &spec.secrets, plan.uid, plan.gid)?;
                plan.secrets = secrets.as_ref().map(|s| s.dir().to_owned());
                Some(netns::supervise(plan, report))
            }
            None => {
                report.set(RunState::Ready, None, false);
                ready = Some(report);
                None
            }
        };
        let caller = Arc::new(Caller {
            endpoint: format!("{}.{}", spec.service, spec.slot),
            service: spec.service.clone(),
            netns,
            certificate,
        });
        Ok(Workload {
            namespace: ns.to_owned(),
            interfaces,
            networks: spec.networks,
            service: spec.service,
            zone,
            caller,
            interception: Interception::default(),
            _dns: dns,
            _command: command,
            _secrets: secrets,
            _ready: ready,
            _uid: Some(uid),
            definition,
        })
    }

    /// Whether it is what `endpoint` asks for already, on `addresses` (as a [`Spec`] holds them):
    /// the same addresses, version and definition.
    pub fn runs(&self, endpoint: &LocalEndpoint, addresses: &[(u32, Ipv4Addr, u8)]) -> bool {
        let (version, command, run) = &self.definition;
        self.interfaces.iter().map(Interface::key).eq(addresses.iter().map(|(id, a, _)| (*id, *a)))
            && (*version, command, run) == (endpoint.version, &endpoint.command, &endpoint.run)
    }

    /// (network ID, address) of each of its interfaces, in order.
    pub fn addresses(&self) -> Vec<(u32, Ipv4Addr)> {
        self.interfaces.iter().map(Interface::key).collect()
    }

    /// Stops everything that runs for the workload (its command killed and reaped first) and
    /// removes its namespace.
    pub async fn remove(mut self) -> std::io::Result<()> {
        if let Some(command) = self._command.take() {
            command.abort();
            // Its task is gone once this returns, and with it the command's process (killed
            // on drop; the rest of its PID namespace dies with it).
            let _ = command.await;
        }
        // Its user goes back to the pool only once nothing of it can run any more: after the
        // namespace (and its cgroup) are gone.
        let uid = self._uid.take();
        let namespace = self.namespace.clone();
        drop(self);
        let deleted = netns::delete(&namespace).await;
        drop(uid);
        deleted
    }
}
