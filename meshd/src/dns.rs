//! Network-scoped DNS: a server in each workload's namespace at 127.0.0.11:53 (UDP and TCP,
//! Docker's convention) that answers only for the networks that workload is on.
//!
//! * `<service>` and `<service>.<network>`: the service's virtual IP (A), and its ports (SRV,
//!   target `<service>.<network>.`);
//! * `tasks.<service>` and `tasks.<service>.<network>`: the endpoint addresses (A);
//! * reverse (PTR) names of those addresses: `<service>.<network>.`.
//!
//! A service on a network the workload is not on does not exist for it (NXDOMAIN). Other names go
//! to the host's resolvers, with a timeout; with no resolver the answer is SERVFAIL at once.
//! TTLs are short, and the records change as soon as the node's slice does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use mesh_api::slice::NodeSlice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::task::AbortOnDropHandle;
use tracing::debug;

/// Which services a workload's DNS shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Visibility {
    /// Every service on the workload's networks.
    #[default]
    All,
    /// Only the services the policy in force may let the workload reach (and its own).
    Policy,
}

/// Which names outside the mesh a workload's DNS looks up with the host's resolvers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum DnsUpstream {
    /// Only those some egress rule could let the workload reach: the names of its `dns:` rules,
    /// or any name when one of its rules names a network (`cidr:`). Others are refused, so a
    /// workload cannot use DNS as a way out either.
    #[default]
    Policy,
    /// Every name.
    Always,
}

/// The names outside the mesh one workload's DNS looks up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum External {
    #[default]
    Any,
    /// Only these (lower case, no trailing dot); REFUSED for the others.
    Only(BTreeSet<String>),
}

/// Where the server listens inside each workload namespace.
pub const DNS_ADDRESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);
/// TTL of the mesh's own answers: short, so moves are seen quickly even by caching clients.
pub const TTL: u32 = 5;
/// How long an upstream resolver may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries forwarded upstream at once, per workload.
pub const MAX_UPSTREAM: usize = 64;

/// The names one workload can resolve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    /// Lower-case name without trailing dot -> addresses.
    a: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// name -> (port, target).
    srv: BTreeMap<String, BTreeSet<(u16, String)>>,
    /// address -> name (with trailing dot).
    ptr: BTreeMap<Ipv4Addr, String>,
    /// Subnets of the workload's networks: their reverse names are the mesh's to answer.
    subnets: Vec<ipnet::Ipv4Net>,
    /// Which other names are looked up upstream.
    pub external: External,
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    /// The zone of the workload whose endpoint is on `networks`, from the node's slice.
    pub fn for_workload(slice: &NodeSlice, networks: &BTreeSet<String>) -> Zone {
        Zone::visible_to(slice, networks, None)
    }

    /// As [`Zone::for_workload`], limited to the services `visible` names when given.
    pub fn visible_to(
        slice: &NodeSlice,
        networks: &BTreeSet<String>,
        visible: Option<&BTreeSet<String>>,
    ) -> Zone {
        let mut zone = Zone::default();
        for net in slice.networks.iter().filter(|n| networks.contains(&n.name)) {
            zone.subnets.push(net.subnet);
            for s in net.services.iter().filter(|s| visible.is_none_or(|v| v.contains(&s.name))) {
                let full = format!("{}.{}", s.name, net.name);
                for name in [s.name.clone(), full.clone()] {
                    zone.a.entry(name.clone()).or_default().insert(s.vip);
                    for p in &s.ports {
                        zone.srv.entry(name.clone()).or_default().insert((p.port, format!("{full}.")));
                    }
                    zone.a.entry(format!("tasks.{name}")).or_default().extend(s.endpoints.iter().copied());
                }
                zone.ptr.insert(s.vip, format!("{full}."));
                for e in &s.endpoints {
                    zone.ptr.insert(*e, format!("{full}."));
                }
            }
        }
        zone
    }

    /// The addresses of `name` (any case, with or without the trailing dot), if the zone has it.
    fn lookup_a(&self, name: &str) -> Option<&BTreeSet<Ipv4Addr>> {
        self.a.get(&key(name))
    }

    /// The answer to `query`, or `None` when the name is not the mesh's (forward it upstream).
    pub fn answer(&self, query: &Message) -> Option<Message> {
        let q = query.queries.first()?;
        let name = q.name().to_ascii();
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.authoritative = true;
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(q.clone());
        if let Some(addr) = reverse(&name) {
            let target = self.ptr.get(&addr)?;
            if q.query_type() == RecordType::PTR {
                let target = Name::from_ascii(target).ok()?;
                reply.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(target))));
            }
            return Some(reply);
        }
        let k = key(&name);
        let known = self.lookup_a(&k).is_some() || self.srv.contains_key(&k);
        if !known {
            // Not a name of this workload's networks: the caller decides between NXDOMAIN (a
            // mesh-shaped name) and the upstream resolvers.
            return None;
        }
        match q.query_type() {
            RecordType::A | RecordType::ANY => {
                for a in self.lookup_a(&k).into_iter().flatten() {
                    reply.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::A(A(*a))));
                }
            }
            RecordType::SRV => {
                for (port, target) in self.srv.get(&k).into_iter().flatten() {
                    let Ok(target) = Name::from_ascii(target) else { continue };
                    reply.add_answer(Record::from_rdata(
                        q.name().clone(),
                        TTL,
                        RData::SRV(SRV::new(0, 0, *port, target)),
                    ));
                }
            }
            _ => {}
        }
        Some(reply)
    }

    /// Whether `name` looks like one of the mesh's names though the workload cannot see it: a
    /// single label (a service name) or `tasks.`-prefixed. Those get NXDOMAIN, never a trip
    /// upstream that could leak which services a workload asks for.
    pub fn is_mesh_shaped(name: &str) -> bool {
        let k = key(name);
        !k.is_empty() && (!k.contains('.') || k.starts_with("tasks."))
    }
}

/// The IPv4 address of an `in-addr.arpa` name.
fn reverse(name: &str) -> Option<Ipv4Addr> {
    let k = key(name);
    let rest = k.strip_suffix(".in-addr.arpa")?;
    let octets: Vec<u8> = rest.split('.').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    (octets.len() == 4).then(|| Ipv4Addr::new(octets[3], octets[2], octets[1], octets[0]))
}

/// Answers one query: the zone, else NXDOMAIN for mesh-shaped names, else upstream.
pub async fn respond(zone: &Zone, upstream: &Upstream, request: &[u8]) -> Option<Vec<u8>> {
    let query = match Message::from_vec(request) {
        Ok(q) if q.metadata.message_type == MessageType::Query && q.queries.len() == 1 => q,
        Ok(q) => {
            return Message::error_msg(q.metadata.id, q.metadata.op_code, ResponseCode::FormErr)
                .to_vec()
                .ok();
        }
        Err(_) if request.len() >= 2 => {
            let id = u16::from_be_bytes([request[0], request[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        }
        Err(_) => return None,
    };
    let reply = match zone.answer(&query) {
        Some(reply) => reply,
        None => {
            let q = &query.queries[0];
            let name = q.name().to_ascii();
            if Zone::is_mesh_shaped(&name) || reverse(&name).is_some_and(|a| zone.ptr_is_mesh(a)) {
                let mut r =
                    Message::error_msg(query.metadata.id, query.metadata.op_code, ResponseCode::NXDomain);
                r.add_query(q.clone());
                r
            } else if let External::Only(names) = &zone.external
                && !names.contains(&key(&name))
            {
                debug!(%name, "a name no egress rule names: refused");
                let mut r =
                    Message::error_msg(query.metadata.id, query.metadata.op_code, ResponseCode::Refused);
                r.add_query(q.clone());
                r
            } else {
                upstream.forward(&query).await
            }
        }
    };
    reply.to_vec().ok()
}

impl Zone {
    /// Whether `addr` lies in one of the workload's networks (so its reverse name is ours).
    fn ptr_is_mesh(&self, addr: Ipv4Addr) -> bool {
        self.subnets.iter().any(|s| s.contains(&addr))
    }
}

/// The host's resolvers, for names that are not the mesh's.
pub struct Upstream {
    resolver: Option<hickory_resolver::TokioResolver>,
    permits: Semaphore,
}

impl Upstream {
    /// From the host's resolver configuration (`/etc/resolv.conf`); none if it has none.
    pub fn from_system() -> Upstream {
        let resolver = hickory_resolver::TokioResolver::builder_tokio()
            .ok()
            .map(|mut b| {
                b.options_mut().timeout = UPSTREAM_TIMEOUT;
                b.options_mut().attempts = 1;
                b.build()
            })
            .and_then(Result::ok);
        Upstream { resolver, permits: Semaphore::new(MAX_UPSTREAM) }
    }

    /// The name servers at `servers` (port 53, UDP then TCP); the host's (`/etc/resolv.conf`)
    /// when none is given.
    pub fn with_servers(servers: &[std::net::IpAddr]) -> Upstream {
        if servers.is_empty() {
            return Upstream::from_system();
        }
        use hickory_resolver::config::{NameServerConfig, ResolverConfig};
        let config = ResolverConfig::from_name_servers(
            servers.iter().map(|ip| NameServerConfig::udp_and_tcp(*ip)).collect(),
        );
        let mut builder = hickory_resolver::TokioResolver::builder_with_config(
            config,
            hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
        );
        builder.options_mut().timeout = UPSTREAM_TIMEOUT;
        builder.options_mut().attempts = 1;
        Upstream { resolver: builder.build().ok(), permits: Semaphore::new(MAX_UPSTREAM) }
    }

    /// No upstream at all: everything that is not the mesh's is SERVFAIL.
    pub fn none() -> Upstream {
        Upstream { resolver: None, permits: Semaphore::new(MAX_UPSTREAM) }
    }

    /// The IPv4 addresses `name` resolves to, and until when they hold.
    pub async fn resolve_v4(&self, name: &str) -> Result<(Vec<Ipv4Addr>, std::time::Instant), String> {
        let resolver =
            self.resolver.as_ref().ok_or("no upstream resolver (the host's resolv.conf names none)")?;
        let fqdn = format!("{name}.");
        match tokio::time::timeout(UPSTREAM_TIMEOUT, resolver.lookup(fqdn.as_str(), RecordType::A)).await {
            Ok(Ok(lookup)) => {
                let addresses = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None })
                    .collect();
                Ok((addresses, lookup.valid_until()))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {UPSTREAM_TIMEOUT:?}")),
        }
    }

    async fn forward(&self, query: &Message) -> Message {
        let q = &query.queries[0];
        let fail = |code| {
            let mut r = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
            r.add_query(q.clone());
            r.metadata.recursion_available = true;
            r
        };
        let Some(resolver) = &self.resolver else { return fail(ResponseCode::ServFail) };
        let Ok(_permit) = self.permits.try_acquire() else { return fail(ResponseCode::ServFail) };
        match tokio::time::timeout(UPSTREAM_TIMEOUT, resolver.lookup(q.name().clone(), q.query_type())).await
        {
            Ok(Ok(lookup)) => {
                let mut r = Message::response(query.metadata.id, query.metadata.op_code);
                r.metadata.recursion_desired = query.metadata.recursion_desired;
                r.metadata.recursion_available = true;
                r.add_query(q.clone());
                r.add_answers(lookup.answers().iter().cloned());
                r
            }
            Ok(Err(e)) if e.is_nx_domain() => fail(ResponseCode::NXDomain),
            // The name exists without records of that type: an empty answer.
            Ok(Err(e)) if e.is_no_records_found() => fail(ResponseCode::NoError),
            _ => fail(ResponseCode::ServFail),
        }
    }
}

/// Serves `zone` on `udp` and `tcp` until the task is aborted.
pub async fn serve(udp: UdpSocket, tcp: TcpListener, zone: Arc<ArcSwap<Zone>>, upstream: Arc<Upstream>) {
    let udp = Arc::new(udp);
    let tcp_zone = zone.clone();
    let tcp_upstream = upstream.clone();
    // The TCP side stops with the server.
    let _tcp = AbortOnDropHandle::new(tokio::spawn(async move {
        let mut backoff = mesh_api::accept::AcceptBackoff::default();
        loop {
            let mut conn = match tcp.accept().await {
                Ok((conn, _)) => {
                    backoff.reset();
                    conn
                }
                Err(e) => {
                    backoff.wait("DNS over TCP", &e).await;
                    continue;
                }
            };
            let zone = tcp_zone.clone();
            let upstream = tcp_upstream.clone();
            tokio::spawn(async move {
                let work = async {
                    loop {
                        let len = conn.read_u16().await? as usize;
                        let mut buf = vec![0u8; len];
                        conn.read_exact(&mut buf).await?;
                        let z = zone.load_full();
                        if let Some(reply) = respond(&z, &upstream, &buf).await {
                            conn.write_u16(reply.len() as u16).await?;
                            conn.write_all(&reply).await?;
                        }
                    }
                    #[allow(unreachable_code)]
                    Ok::<(), std::io::Error>(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(30), work).await;
            });
        }
    }));
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, from)) = udp.recv_from(&mut buf).await else { continue };
        let request = buf[..n].to_vec();
        let (udp, zone, upstream) = (udp.clone(), zone.load_full(), upstream.clone());
        tokio::spawn(async move {
            if let Some(mut reply) = respond(&zone, &upstream, &request).await {
                if reply.len() > 512 {
                    // Too big for plain UDP: truncated, the client retries over TCP.
                    if let Ok(m) = Message::from_vec(&reply) {
                        reply = m.truncate().to_vec().unwrap_or(reply);
                    }
                }
                if let Err(e) = udp.send_to(&reply, from).await {
                    debug!(error = %e, "DNS reply failed");
                }
            }
        });
    }
}
