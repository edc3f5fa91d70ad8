//! The spec `meshctl lab up` applies and checks (see `examples/lab.toml`).

use std::path::PathBuf;

use serde::Deserialize;

/// A spec: what `lab up` creates and checks (see `examples/lab.toml`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Spec {
    #[serde(default, rename = "network")]
    pub(super) networks: Vec<NetworkSpec>,
    #[serde(default, rename = "service")]
    pub(super) services: Vec<ServiceSpec>,
    /// A policy file, relative to the spec.
    pub(super) policy: Option<PathBuf>,
    #[serde(default, rename = "outside")]
    pub(super) outside: Vec<OutsideSpec>,
    #[serde(default, rename = "check")]
    pub(super) checks: Vec<CheckSpec>,
}

/// A namespace on the underlay bridge outside the cluster: a client of published ports, or a
/// server on "the internet" for egress rules to name.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct OutsideSpec {
    /// `PREFIX-NAME`; a check's `from` may name it.
    pub(super) name: String,
    /// One of the underlay subnet's addresses that no host holds (the policy may name it).
    pub(super) address: std::net::Ipv4Addr,
    /// Run there with `sh -c` (`{spec_dir}` is the spec's directory).
    pub(super) command: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NetworkSpec {
    pub(super) name: String,
    pub(super) subnet: String,
    #[serde(default)]
    pub(super) unencrypted: bool,
    /// `aes-gcm` (the default) or `wireguard`, as `network create --transport`.
    pub(super) transport: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSpec {
    pub(super) name: String,
    pub(super) networks: Vec<String>,
    #[serde(default)]
    pub(super) ports: Vec<String>,
    #[serde(default = "one")]
    pub(super) replicas: u32,
    /// `{spec_dir}` is replaced by the spec's directory.
    pub(super) command: Option<String>,
    /// As `service create --publish`: `[ingress:|host:]PUBLISHED:TARGET[/tcp|/http]`.
    #[serde(default)]
    pub(super) publish: Vec<String>,
}

fn one() -> u32 {
    1
}

/// A request a workload makes, and the answer expected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckSpec {
    pub(super) name: String,
    /// The calling service (its first endpoint's namespace), or an outside namespace.
    pub(super) from: String,
    /// `{h1}`, `{h2}`, ... are the hosts' underlay addresses (for published ports).
    pub(super) url: String,
    #[serde(default = "get")]
    pub(super) method: String,
    #[serde(default)]
    pub(super) headers: Vec<String>,
    /// An HTTP status, or 0 for "no answer at all" (unreachable).
    pub(super) expect: u16,
}

fn get() -> String {
    "GET".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_spec_reads() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/lab.toml");
        let spec: Spec = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(spec.networks.iter().any(|n| n.name == "front"));
        assert!(spec.services.iter().any(|s| s.name == "api" && s.command.is_some()));
        assert!(spec.checks.iter().any(|c| c.expect == 403));
        assert!(spec.services.iter().any(|s| s.name == "web" && !s.publish.is_empty()));
        assert!(spec.outside.iter().any(|o| spec.checks.iter().any(|c| c.from == o.name)));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(
            toml::from_str::<Spec>("[[network]]\nname = \"a\"\nsubnet = \"10.0.0.0/24\"\nmtu = 1\n").is_err()
        );
    }
}
