//! `meshd ping SERVICE|ADDRESS`: ICMP echoes through the overlay, from a workload of this node
//! that shares a network with the target, with the path each takes — the peer node that holds
//! the address (or this node), the network, its transport and key epoch — and the round trip.
//! The overlay carries only workloads' traffic, so a node with no endpoint on the target's
//! networks has nothing to ping from, and says so.

use std::net::Ipv4Addr;

use mesh_api::keys::KeyUse;
use mesh_api::slice::NodeSlice;
use serde::{Deserialize, Serialize};

/// At most this many addresses are pinged for one service.
const MAX_PROBES: usize = 8;

/// One echo path: from a local workload to one address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub network: String,
    /// The local workload's namespace and its address on the network.
    pub from_namespace: String,
    pub from: Ipv4Addr,
    pub to: Ipv4Addr,
    /// The node that holds `to`, or none for this node.
    pub peer: Option<String>,
    /// `aes-256-gcm` (with the key epoch in use), `wireguard` or `unencrypted`.
    pub transport: String,
    pub epoch: Option<u32>,
}

/// A probe's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    pub probe: Probe,
    pub sent: u32,
    pub received: u32,
    /// Milliseconds, when any answer came.
    pub rtt_avg_ms: Option<f64>,
    pub error: Option<String>,
}

/// The probes for `target` (a service, `SERVICE.NETWORK`, or an overlay address) in `slice`,
/// each from a workload named with `prefix`.
pub fn plan(slice: &NodeSlice, prefix: &str, target: &str) -> Result<Vec<Probe>, String> {
    let (name, only_network) = match target.rsplit_once('.') {
        Some((service, network)) if target.parse::<Ipv4Addr>().is_err() => (service, Some(network)),
        _ => (target, None),
    };
    let mut probes = Vec::new();
    let mut shared_none = Vec::new();
    for network in slice.networks.iter().filter(|n| only_network.is_none_or(|o| o == n.name)) {
        let targets: Vec<Ipv4Addr> = match target.parse::<Ipv4Addr>() {
            Ok(address) if network.subnet.contains(&address) => vec![address],
            Ok(_) => continue,
            Err(_) => match network.services.iter().find(|s| s.name == name) {
                Some(record) => record.endpoints.clone(),
                None => continue,
            },
        };
        let Some((from_namespace, from)) = slice.endpoints.iter().find_map(|e| {
            let address = e.addresses.get(&network.name)?;
            Some((crate::netns::namespace(prefix, &e.service, e.slot), *address))
        }) else {
            shared_none.push(network.name.clone());
            continue;
        };
        let epoch = network.epochs().into_iter().find(|(u, _)| *u == KeyUse::Current).map(|(_, e)| e);
        for to in targets {
            let local = slice.endpoints.iter().any(|e| e.addresses.get(&network.name) == Some(&to));
            let peer = if local {
                None
            } else {
                network.peers.iter().find(|p| p.address == to).map(|p| p.node.to_string())
            };
            probes.push(Probe {
                network: network.name.clone(),
                from_namespace: from_namespace.clone(),
                from,
                to,
                peer,
                transport: match (network.encrypted, network.wireguard) {
                    (_, Some(_)) => "wireguard",
                    (true, None) => "aes-256-gcm",
                    (false, None) => "unencrypted",
                }
                .into(),
                epoch: epoch.filter(|_| network.encrypted && network.wireguard.is_none()),
            });
        }
    }
    probes.truncate(MAX_PROBES);
    if probes.is_empty() {
        return Err(if shared_none.is_empty() {
            format!("`{target}` is no service or address on the networks this node has an endpoint on")
        } else {
            format!(
                "this node has no endpoint on {} to ping from (the overlay carries only workloads' traffic)",
                shared_none.join(", ")
            )
        });
    }
    Ok(probes)
}

/// Sends `count` echoes along `probe` (`ping` in the workload's namespace) and reads the answer.
pub async fn run(probe: Probe, count: u32) -> Echo {
    let out = tokio::process::Command::new("ip")
        .args(["netns", "exec", &probe.from_namespace, "ping", "-n", "-q", "-c", &count.to_string()])
        .args(["-i", "0.2", "-W", "1", "-I", &probe.from.to_string(), &probe.to.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            let (sent, received) = counts(&text).unwrap_or((count, 0));
            let error = (received == 0).then(|| {
                let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
                if err.is_empty() { "no answer".to_owned() } else { err }
            });
            Echo { probe, sent, received, rtt_avg_ms: average(&text), error }
        }
        Err(e) => Echo { probe, sent: 0, received: 0, rtt_avg_ms: None, error: Some(format!("ping: {e}")) },
    }
}

/// (transmitted, received) from ping's summary.
fn counts(text: &str) -> Option<(u32, u32)> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let mut numbers = line.split(',').filter_map(|part| part.split_whitespace().next()?.parse().ok());
    Some((numbers.next()?, numbers.next()?))
}

/// The average round trip from ping's `rtt min/avg/max/mdev = a/b/c/d ms`.
fn average(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("rtt") || l.starts_with("round-trip"))?;
    line.split('=').nth(1)?.trim().split('/').nth(1)?.parse().ok()
}

/// A table of the echoes.
pub fn render(echoes: &[Echo]) -> String {
    let mut out = String::new();
    for e in echoes {
        let p = &e.probe;
        let path = match &p.peer {
            Some(node) => format!("node {node}"),
            None => "this node".to_owned(),
        };
        let transport = match p.epoch {
            Some(epoch) => format!("{}, key epoch {epoch}", p.transport),
            None => p.transport.clone(),
        };
        let outcome = match (e.rtt_avg_ms, &e.error) {
            (Some(ms), _) => format!("{}/{} answered, {ms:.3} ms average", e.received, e.sent),
            (None, Some(why)) => format!("{}/{} answered: {why}", e.received, e.sent),
            (None, None) => format!("{}/{} answered", e.received, e.sent),
        };
        out.push_str(&format!(
            "{} -> {} on {} via {path} ({transport}), from {}: {outcome}\n",
            p.from, p.to, p.network, p.from_namespace
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_reads_its_summary() {
        let text = "PING 10.1.0.3 (10.1.0.3) from 10.1.0.2 : 56(84) bytes of data.\n\n--- 10.1.0.3 ping statistics ---\n3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\nrtt min/avg/max/mdev = 0.101/0.215/0.329/0.114 ms\n";
        assert_eq!(counts(text), Some((3, 2)));
        assert_eq!(average(text), Some(0.215));
        let lost =
            "--- x ping statistics ---\n3 packets transmitted, 0 received, 100% packet loss, time 2040ms\n";
        assert_eq!((counts(lost), average(lost)), (Some((3, 0)), None));
    }
}
