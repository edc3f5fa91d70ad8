//! The domain types a node or an admin shares with the managers beyond IDs and keys: a node's
//! state and a service's ports.

use serde::{Deserialize, Serialize};

/// Whether a node may still act in the cluster. A removed node stays in the state so that its ID
/// is refused on every call (the denylist) and never issued again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Active,
    Removed,
}

/// Protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: the mesh applies the L4 part of the policy when a connection opens.
    Tcp,
    Udp,
    /// TCP carrying HTTP/1.1 or HTTP/2 (gRPC included): the mesh decides on every request.
    Http,
}

impl Protocol {
    /// The transport under it: HTTP runs on TCP.
    pub fn transport(self) -> Protocol {
        match self {
            Protocol::Udp => Protocol::Udp,
            Protocol::Tcp | Protocol::Http => Protocol::Tcp,
        }
    }
}

/// A port a service listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// How a service's command runs: its environment and the secrets it reads, and how it is
/// confined beyond what every workload gets (a user of its own with no capabilities, its own
/// mount and PID namespaces, the host's files read-only, a private `/tmp` and `/run`, the node's
/// state hidden): who it runs as, what it may write, what it may use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// `NAME`, `UID` or `UID:GID` as the node knows it; empty: a user of the workload's own.
    #[serde(default)]
    pub user: String,
    /// Absolute host paths the workload may write (read-write bind mounts; they must exist).
    #[serde(default)]
    pub writable: Vec<String>,
    /// Absolute host paths the workload reads where its view would cover them (its private
    /// `/tmp` or `/run`): read-only bind mounts; they must exist.
    #[serde(default)]
    pub readable: Vec<String>,
    /// At most this many thousandths of a CPU.
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    /// At most this much memory, in bytes.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// `NAME=VALUE`, set for the command (after `PATH` and `HOME`, which they may replace).
    #[serde(default)]
    pub env: Vec<String>,
    /// Secrets by name, each read by the workload at `/run/secrets/NAME`.
    #[serde(default)]
    pub secrets: Vec<String>,
}

/// What `service update` changes of a service's command and how it runs; what is left empty
/// stays. Control applies it, and so does meshctl to sign what control will make of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DefinitionChange {
    /// The new command (`Some("")`: none).
    pub command: Option<String>,
    /// `NAME=VALUE` set (replacing any `NAME=`), and names removed.
    pub env_add: Vec<String>,
    pub env_rm: Vec<String>,
    pub user: Option<String>,
    pub secret_add: Vec<String>,
    pub secret_rm: Vec<String>,
    /// 0: no limit.
    pub cpu_millis: Option<u32>,
    pub memory_bytes: Option<u64>,
}

impl DefinitionChange {
    /// `command` and `run` once changed, checked; the error says what is wrong.
    pub fn apply(
        &self,
        command: &Option<String>,
        run: &RunSpec,
    ) -> Result<(Option<String>, RunSpec), String> {
        let mut command = command.clone();
        let mut run = run.clone();
        if let Some(new) = &self.command {
            command = Some(new.clone()).filter(|c| !c.trim().is_empty());
        }
        let env_name = |e: &str| e.split_once('=').map_or(e, |(n, _)| n).to_owned();
        for name in &self.env_rm {
            if !run.env.iter().any(|e| env_name(e) == *name) {
                return Err(format!("the service sets no environment variable `{name}`"));
            }
            run.env.retain(|e| env_name(e) != *name);
        }
        for e in &self.env_add {
            let name = env_name(e);
            match run.env.iter_mut().find(|held| env_name(held) == name) {
                Some(held) => held.clone_from(e),
                None => run.env.push(e.clone()),
            }
        }
        if let Some(user) = &self.user {
            run.user.clone_from(user);
        }
        for name in &self.secret_rm {
            if !run.secrets.contains(name) {
                return Err(format!("the service reads no secret `{name}`"));
            }
            run.secrets.retain(|s| s != name);
        }
        for name in &self.secret_add {
            if !run.secrets.contains(name) {
                run.secrets.push(name.clone());
            }
        }
        if let Some(cpu) = self.cpu_millis {
            run.cpu_millis = Some(cpu).filter(|c| *c != 0);
        }
        if let Some(memory) = self.memory_bytes {
            run.memory_bytes = Some(memory).filter(|m| *m != 0);
        }
        run.check()?;
        Ok((command, run))
    }
}

/// Most environment variables a service sets, and most bytes of them together.
pub const MAX_ENV: usize = 128;
pub const MAX_ENV_BYTES: usize = 32 << 10;
/// Most secrets one service reads.
pub const MAX_SECRETS: usize = 64;
/// Most bytes of one secret.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// Longest network or service name.
pub const MAX_NAME: usize = 63;

/// Whether `name` can name a network or a service: 1-63 of a-z, 0-9 and `-`, starting with a
/// letter, not ending with `-` (it becomes part of namespace names, paths and DNS names).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
}

/// Whether `name` can name a secret (and be its file name): 1-64 of a-z, A-Z, 0-9, `.`, `_`
/// and `-`, not starting with `.` or `-`.
pub fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The smallest memory limit a workload may be given: less and it cannot start a shell.
pub const MIN_MEMORY: u64 = 4 << 20;
/// The largest CPU limit, in thousandths: 1,024 CPUs.
pub const MAX_CPU_MILLIS: u32 = 1024 * 1000;

impl RunSpec {
    /// Checks what an admin asked for; the error says what is wrong and what is allowed.
    pub fn check(&self) -> Result<(), String> {
        if !self.user.is_empty() {
            let user = &self.user;
            let named = user.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                && user.len() <= 32
                && user.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "_-".contains(c));
            let numeric = match user.split_once(':') {
                Some((u, g)) => u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok(),
                None => user.parse::<u32>().is_ok(),
            };
            if !named && !numeric {
                return Err(format!("user `{user}` is not valid: expected NAME, UID or UID:GID"));
            }
            if user == "root" || user.split(':').any(|id| id.parse::<u32>() == Ok(0)) {
                return Err(format!("user `{user}`: a workload never runs as root (uid or gid 0)"));
            }
        }
        for path in self.writable.iter().chain(&self.readable) {
            let clean = path.starts_with('/')
                && path.len() > 1
                && !path.ends_with('/')
                && path.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
                && !path.contains('\0');
            if !clean {
                return Err(format!(
                    "path `{path}` is not valid: expected an absolute path without `.`, `..`, \
                     empty parts or a trailing slash, other than `/`"
                ));
            }
        }
        if let Some(cpu) = self.cpu_millis
            && !(1..=MAX_CPU_MILLIS).contains(&cpu)
        {
            return Err(format!("CPU limit {cpu}/1000 is not valid: from 0.001 to 1024 CPUs"));
        }
        if let Some(memory) = self.memory_bytes
            && memory < MIN_MEMORY
        {
            return Err(format!("memory limit {memory} bytes is not valid: at least 4 MiB"));
        }
        if self.env.len() > MAX_ENV || self.env.iter().map(String::len).sum::<usize>() > MAX_ENV_BYTES {
            return Err(format!("at most {MAX_ENV} environment variables of {MAX_ENV_BYTES} bytes in all"));
        }
        for pair in &self.env {
            let name = pair.split_once('=').map(|(n, _)| n);
            let valid = name.is_some_and(|n| {
                n.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
            if !valid || pair.contains('\0') {
                return Err(format!(
                    "environment `{pair}` is not valid: expected NAME=VALUE, NAME of A-Z, a-z, 0-9 and `_`, \
                     not starting with a digit"
                ));
            }
        }
        if self.secrets.len() > MAX_SECRETS {
            return Err(format!("at most {MAX_SECRETS} secrets per service"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.secrets {
            if !valid_secret_name(name) {
                return Err(format!(
                    "secret name `{name}` is not valid: 1-64 of a-z, A-Z, 0-9, `.`, `_`, `-`, not starting with `.` or `-`"
                ));
            }
            if !seen.insert(name) {
                return Err(format!("secret `{name}` is listed twice"));
            }
        }
        Ok(())
    }
}

/// What a workload is doing, as its node reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// Its namespace is being made, or its command started and not yet seen running.
    Starting,
    Running,
    /// Its command exited and is started again after a pause.
    Restarting,
    /// It cannot run (its user, a writable path, its limits or its secrets could not be set up).
    Failed,
    /// No command: the endpoint is its namespace and interfaces, which are in place.
    Ready,
    /// Its node pins the operator's spec-signing key and the spec is not signed.
    Unsigned,
    /// Its node pins the operator's spec-signing key and the signature does not verify, or
    /// the signed spec says something else than the slice.
    BadSignature,
    /// Its node pins the operator's key and the signed spec is older than the oldest a later
    /// spec of the service, seen by the node, allows.
    Replayed,
}

impl RunState {
    pub fn name(self) -> &'static str {
        match self {
            RunState::Starting => "starting",
            RunState::Running => "running",
            RunState::Restarting => "restarting",
            RunState::Failed => "failed",
            RunState::Ready => "ready",
            RunState::Unsigned => "unsigned",
            RunState::BadSignature => "bad-signature",
            RunState::Replayed => "replayed",
        }
    }

    pub fn parse(text: &str) -> Option<RunState> {
        [
            RunState::Starting,
            RunState::Running,
            RunState::Restarting,
            RunState::Failed,
            RunState::Ready,
            RunState::Unsigned,
            RunState::BadSignature,
            RunState::Replayed,
        ]
        .into_iter()
        .find(|s| s.name() == text)
    }

    /// Whether the endpoint does its job: its command runs, or it has none.
    pub fn up(self) -> bool {
        matches!(self, RunState::Running | RunState::Ready)
    }
}

/// One endpoint's state as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    pub service: String,
    pub slot: u32,
    pub state: RunState,
    /// How often its command was started again.
    pub restarts: u32,
    /// Unix seconds: since when it is in this state.
    pub since: i64,
    /// How the command last ended (`exit 1`, `signal 9`), or why it cannot run.
    pub last_exit: Option<String>,
    /// The version of its service's definition it runs.
    #[serde(default)]
    pub version: u64,
}

/// A line a workload wrote, as its node kept it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Unix milliseconds, when meshd read it.
    pub at_millis: i64,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
}

/// Longest line kept (longer ones are cut), most lines one answer carries, and most bytes.
pub const MAX_LOG_LINE: usize = 4096;
pub const MAX_LOG_LINES: usize = 10_000;
pub const MAX_LOG_BYTES: usize = 2 << 20;

/// Most endpoints one node reports, and the longest text of a report.
pub const MAX_REPORTED: usize = 4096;
pub const MAX_REPORT_TEXT: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut RunSpec)) -> Result<(), String> {
        let mut s = RunSpec::default();
        f(&mut s);
        s.check()
    }

    #[test]
    fn a_sandbox_never_names_root_nor_a_path_that_climbs_out() {
        assert!(with(|_| {}).is_ok());
        for user in ["www-data", "1000", "1000:1000", "_svc"] {
            assert!(with(|s| s.user = user.into()).is_ok(), "{user}");
        }
        for user in ["root", "0", "0:0", "1000:0", "0:1000", "Root", "a b", "1000:", ":1000", "-x"] {
            assert!(with(|s| s.user = user.into()).is_err(), "{user} accepted");
        }
        assert!(with(|s| s.writable = vec!["/srv/data".into()]).is_ok());
        for path in ["/", "srv", "/srv/../etc", "/srv/./x", "/srv//x", "/srv/", ""] {
            assert!(with(|s| s.writable = vec![path.into()]).is_err(), "{path} accepted");
        }
        assert!(with(|s| s.cpu_millis = Some(0)).is_err());
        assert!(with(|s| s.cpu_millis = Some(500)).is_ok());
        assert!(with(|s| s.memory_bytes = Some(1 << 20)).is_err());
        assert!(with(|s| s.memory_bytes = Some(64 << 20)).is_ok());
        assert!(with(|s| s.env = vec!["MODE=fast".into(), "_X=".into(), "A=b=c".into()]).is_ok());
        for pair in ["NOVALUE", "=x", "1A=x", "A-B=x", "A\0=x", "A=\0"] {
            assert!(with(|s| s.env = vec![pair.into()]).is_err(), "{pair:?} accepted");
        }
        assert!(with(|s| s.secrets = vec!["db.password".into()]).is_ok());
        for name in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(with(|s| s.secrets = vec![name.into()]).is_err(), "{name:?} accepted");
        }
        assert!(with(|s| s.secrets = vec!["a".into(), "a".into()]).is_err(), "a secret twice");
    }
}

/// How a network's datagrams are sealed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// AES-256-GCM with pair keys derived by control (the default).
    #[default]
    AesGcm,
    /// WireGuard (boringtun's Noise sessions): keys made by the two nodes alone.
    #[serde(rename = "wireguard")]
    WireGuard,
    /// Unencrypted (`--unencrypted`).
    None,
}

impl Transport {
    pub const NAMES: [&str; 2] = ["aes-gcm", "wireguard"];
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::AesGcm => "aes-gcm",
            Transport::WireGuard => "wireguard",
            Transport::None => "none",
        })
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Transport, String> {
        match s {
            "aes-gcm" => Ok(Transport::AesGcm),
            "wireguard" => Ok(Transport::WireGuard),
            "none" => Ok(Transport::None),
            other => Err(format!("unknown transport `{other}`: one of aes-gcm, wireguard")),
        }
    }
}

/// Which nodes listen on a published port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Every node labelled `ingress=true`, or every node when none is.
    #[default]
    Ingress,
    /// Only the nodes running an endpoint of the service.
    Host,
}

/// The label that picks the nodes `ingress`-mode ports are published on.
pub const INGRESS_LABEL: (&str, &str) = ("ingress", "true");

/// A port a service is reached at from outside the mesh (`--publish [MODE:]PUBLISHED:TARGET[/PROTO]`):
/// meshd listens on `published` in the host's namespace of the nodes `mode` picks and carries
/// each connection through the mesh to an endpoint's `target` port, as the source `ingress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Publish {
    pub mode: PublishMode,
    pub published: u16,
    pub target: u16,
    /// `tcp` or `http`: the protocol of the target port (HTTP is decided per request).
    pub protocol: Protocol,
}

impl Publish {
    /// Parses `[MODE:]PUBLISHED:TARGET[/tcp|/http]`; the protocol, when left out, is `None` (the
    /// target port's).
    pub fn parse(text: &str) -> Result<(PublishMode, u16, u16, Option<Protocol>), String> {
        let usage = "expected [ingress:|host:]PUBLISHED:TARGET[/tcp|/http], e.g. 8080:80/http";
        let (ports, protocol) = match text.split_once('/') {
            Some((ports, "tcp")) => (ports, Some(Protocol::Tcp)),
            Some((ports, "http")) => (ports, Some(Protocol::Http)),
            Some((_, "udp")) => return Err(format!("`{text}`: UDP ports cannot be published")),
            Some((_, other)) => return Err(format!("`{text}`: unknown protocol `{other}`; {usage}")),
            None => (text, None),
        };
        let parts: Vec<&str> = ports.split(':').collect();
        let (mode, published, target) = match parts.as_slice() {
            [published, target] => (PublishMode::Ingress, *published, *target),
            ["ingress", published, target] => (PublishMode::Ingress, *published, *target),
            ["host", published, target] => (PublishMode::Host, *published, *target),
            [mode, _, _] => return Err(format!("`{text}`: unknown mode `{mode}`: ingress or host")),
            _ => return Err(format!("`{text}`: {usage}")),
        };
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("`{text}`: `{p}` is not a port (1-65535); {usage}"))
        };
        Ok((mode, port(published)?, port(target)?, protocol))
    }
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        };
        let protocol = if self.protocol == Protocol::Http { "http" } else { "tcp" };
        write!(f, "{mode}:{}:{}/{protocol}", self.published, self.target)
    }
}

#[cfg(test)]
mod publish_tests {
    use super::*;

    #[test]
    fn published_ports_parse_with_their_mode_and_protocol_and_bad_ones_say_why() {
        assert_eq!(Publish::parse("8080:80"), Ok((PublishMode::Ingress, 8080, 80, None)));
        assert_eq!(
            Publish::parse("ingress:443:8443/tcp"),
            Ok((PublishMode::Ingress, 443, 8443, Some(Protocol::Tcp)))
        );
        assert_eq!(Publish::parse("host:80:80/http"), Ok((PublishMode::Host, 80, 80, Some(Protocol::Http))));
        for (bad, why) in [
            ("80", "expected [ingress:|host:]PUBLISHED:TARGET"),
            ("0:80", "`0` is not a port"),
            ("70000:80", "`70000` is not a port"),
            ("80:", "`` is not a port"),
            ("edge:80:80", "unknown mode `edge`"),
            ("80:80/udp", "UDP ports cannot be published"),
            ("80:80/HTTP", "unknown protocol `HTTP`"),
            ("host:1:2:3", "expected"),
            ("-1:80", "is not a port"),
        ] {
            let err = Publish::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let p = Publish { mode: PublishMode::Host, published: 8080, target: 80, protocol: Protocol::Http };
        assert_eq!(p.to_string(), "host:8080:80/http");
    }
}
