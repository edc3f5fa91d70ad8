//! Published ports (`service create/update --publish`): what they may be, and which nodes
//! publish them.

use std::collections::BTreeSet;

use mesh_api::ids::NodeId;
use mesh_api::model::{INGRESS_LABEL, PortSpec, Protocol, Publish, PublishMode};

use super::PlanError;
use crate::state::{ClusterState, NodeState, Service};

/// `texts` as published ports of a service with `ports`: each leads to one of its TCP or HTTP
/// ports and keeps that port's protocol (an HTTP port published as `tcp` would skip the
/// per-request policy), and no published port is listed twice.
pub fn resolve(texts: &[String], ports: &[PortSpec]) -> Result<Vec<Publish>, PlanError> {
    let mut out: Vec<Publish> = Vec::new();
    for text in texts {
        out.push(one(text, ports)?);
    }
    let mut seen = BTreeSet::new();
    for p in &out {
        if !seen.insert(p.published) {
            return Err(PlanError::Run(format!("published port {} is listed twice", p.published)));
        }
    }
    Ok(out)
}

fn one(text: &str, ports: &[PortSpec]) -> Result<Publish, PlanError> {
    let (mode, published, target, protocol) = Publish::parse(text).map_err(PlanError::Run)?;
    let Some(port) = ports.iter().find(|p| p.port == target && p.protocol.transport() == Protocol::Tcp)
    else {
        return Err(PlanError::Run(format!(
            "`{text}` leads to port {target}, which the service does not have as a TCP or HTTP port"
        )));
    };
    if let Some(asked) = protocol
        && asked != port.protocol
    {
        let has = if port.protocol == Protocol::Http { "http" } else { "tcp" };
        return Err(PlanError::Run(format!(
            "`{text}`: port {target} is `{has}`, and a published port keeps its target's protocol"
        )));
    }
    Ok(Publish { mode, published, target, protocol: port.protocol })
}

/// Refuses a published port another service publishes already (every node could be asked to
/// listen on both).
pub fn check_free(state: &ClusterState, service: &str, publish: &[Publish]) -> Result<(), PlanError> {
    for p in publish {
        if let Some(other) = state
            .services
            .values()
            .find(|s| s.name != service && s.publish.iter().any(|q| q.published == p.published))
        {
            return Err(PlanError::Run(format!(
                "port {} is published by service `{}` already",
                p.published, other.name
            )));
        }
    }
    Ok(())
}

/// The nodes that publish `publish` of `service`: in `ingress` mode the active nodes labelled
/// `ingress=true`, or every active node when none is; in `host` mode the nodes running one of its
/// endpoints. Only nodes that run a data plane (they reported an underlay address) count.
pub fn nodes(state: &ClusterState, service: &Service, publish: &Publish) -> BTreeSet<NodeId> {
    let serving = || state.nodes.values().filter(|n| n.state == NodeState::Active && n.underlay.is_some());
    match publish.mode {
        PublishMode::Host => service
            .endpoints
            .values()
            .map(|e| &e.node)
            .filter(|n| serving().any(|s| &s.id == *n))
            .cloned()
            .collect(),
        PublishMode::Ingress => {
            let (key, value) = INGRESS_LABEL;
            let labelled: BTreeSet<NodeId> = serving()
                .filter(|n| n.labels.get(key).is_some_and(|v| v == value))
                .map(|n| n.id.clone())
                .collect();
            if labelled.is_empty() { serving().map(|n| n.id.clone()).collect() } else { labelled }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_published_port_leads_to_a_tcp_port_of_the_service_with_its_protocol() {
        let ports = [
            PortSpec { port: 80, protocol: Protocol::Http },
            PortSpec { port: 5432, protocol: Protocol::Tcp },
            PortSpec { port: 53, protocol: Protocol::Udp },
        ];
        let got = resolve(&["8080:80".into(), "host:15432:5432/tcp".into()], &ports).unwrap();
        assert_eq!(
            got,
            vec![
                Publish { mode: PublishMode::Ingress, published: 8080, target: 80, protocol: Protocol::Http },
                Publish { mode: PublishMode::Host, published: 15432, target: 5432, protocol: Protocol::Tcp },
            ]
        );
        for (bad, why) in [
            ("8080:80/tcp", "port 80 is `http`"),
            ("8080:5432/http", "port 5432 is `tcp`"),
            ("8080:81", "does not have as a TCP or HTTP port"),
            ("5353:53", "does not have as a TCP or HTTP port"),
            ("8080:80/udp", "UDP ports cannot be published"),
        ] {
            let err = resolve(&[bad.into()], &ports).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let twice = resolve(&["8080:80".into(), "host:8080:5432".into()], &ports).unwrap_err();
        assert!(twice.to_string().contains("published port 8080 is listed twice"), "{twice}");
    }
}
