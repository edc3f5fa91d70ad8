//! meshd's configuration: every default as a named constant (the CLI in `main.rs` reads them),
//! the typed configuration of `meshd run`, and the underlay address when none is given.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use crate::dns::Visibility;
use crate::identity::NodeDir;
use crate::session::SessionConfig;

/// The configuration file of `meshd run`, read when it exists (`--config` names another).
pub const DEFAULT_CONFIG: &str = "/etc/mesh/meshd.toml";
/// Where a node's identity is kept.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/meshd";
/// The port of the underlay: overlay datagrams (UDP) and mesh connections (TCP).
pub const DEFAULT_OVERLAY_PORT: u16 = 4800;
/// Prefix of the workload namespaces (`PREFIX-SERVICE-SLOT`).
pub const DEFAULT_NETNS_PREFIX: &str = "mesh";
/// Which services a workload's DNS shows.
pub const DEFAULT_DNS_VISIBILITY: Visibility = Visibility::All;
/// Where Prometheus metrics are served (`off` for nowhere).
pub const DEFAULT_METRICS: &str = "127.0.0.1:9480";

/// Where published ports listen: every IPv4 address of the host.
pub const DEFAULT_PUBLISH_ADDRESS: &str = "0.0.0.0";

/// How `meshd run` runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub session: SessionConfig,
    /// Prefix of the workload namespaces (unique per meshd on a machine).
    pub netns_prefix: String,
    /// Whether to run the data plane (namespaces, tun devices, the underlay socket; needs root).
    pub dataplane: bool,
    /// Which services workloads' DNS shows.
    pub dns_visibility: Visibility,
    /// Where to serve Prometheus metrics, if anywhere (with the data plane only).
    pub metrics: Option<SocketAddr>,
    /// Where published ports listen in the host's namespace.
    pub publish_address: std::net::Ipv4Addr,
    /// Which names outside the mesh workloads' DNS looks up.
    pub dns_upstream: crate::dns::DnsUpstream,
    /// The name servers for names outside the mesh (empty: the host's resolv.conf).
    pub resolvers: Vec<std::net::IpAddr>,
}

/// The underlay address: `given` (IP or IP:PORT, the port [`DEFAULT_OVERLAY_PORT`] unless
/// named), or this host's address towards the first manager recorded in `state_dir`.
pub fn underlay_address(given: Option<&str>, state_dir: &Path) -> Result<SocketAddr, String> {
    match given {
        Some(text) => text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, DEFAULT_OVERLAY_PORT)))
            .map_err(|_| format!("--underlay `{text}` is not an IP or IP:PORT")),
        None => {
            let managers = NodeDir::new(state_dir).load().map_err(|e| e.to_string())?.managers;
            let control = managers.first().cloned().unwrap_or_default();
            local_ip_towards(&control)
                .map(|ip| SocketAddr::new(ip, DEFAULT_OVERLAY_PORT))
                .map_err(|e| format!("cannot tell this host's address towards control {control}: {e}"))
        }
    }
}

/// The address of this host that routes to `control`: the default underlay IP.
pub fn local_ip_towards(control: &str) -> std::io::Result<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(control)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_underlay_without_a_port_gets_the_default_one_and_garbage_is_named() {
        let dir = Path::new("/nonexistent");
        assert_eq!(underlay_address(Some("192.0.2.7"), dir), Ok("192.0.2.7:4800".parse().unwrap()));
        assert_eq!(underlay_address(Some("192.0.2.7:5000"), dir), Ok("192.0.2.7:5000".parse().unwrap()));
        assert_eq!(
            underlay_address(Some("host-a"), dir),
            Err("--underlay `host-a` is not an IP or IP:PORT".to_owned())
        );
    }

    #[test]
    fn the_default_metrics_address_parses() {
        let parsed = mesh_api::metrics_http::parse_addr(DEFAULT_METRICS).unwrap();
        assert_eq!(parsed.0, Some("127.0.0.1:9480".parse().unwrap()));
    }
}
