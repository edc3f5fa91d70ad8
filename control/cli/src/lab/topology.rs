//! What a lab is made of, and every name, address and path in it: pure, so that the lab, its
//! record and the scripts reading `lab.env` agree on them.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use super::LabError;
use super::record::Program;

/// The prefix of `meshctl lab`'s names when not told otherwise (`meshlab-h1`, `meshlab-br`).
pub const DEFAULT_PREFIX: &str = "meshlab";
/// `meshctl lab`'s underlay when not told otherwise.
pub const DEFAULT_SUBNET: &str = "10.77.0.0/24";
/// The most hosts a lab has.
pub const MAX_HOSTS: usize = 50;
/// The port every manager listens on, at its host's underlay address.
pub const CONTROL_PORT: u16 = 7400;
/// The longest prefix: workload namespaces add `-hN-SERVICE-SLOT` to it.
const MAX_PREFIX: usize = 20;
/// Host `i` has the subnet's address `HOST_OFFSET + i` (h1 is .11 in a /24).
const HOST_OFFSET: u32 = 10;

/// Which hosts run meshd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MeshdOn {
    /// Every host, those with a manager too.
    Every,
    /// Only the hosts without a manager.
    Workers,
}

/// A lab to build: `hosts` namespaces `PREFIX-h1..hN` on one bridge (`PREFIX-br`), managers on
/// h1..hM (the first makes the cluster, the others join it with the manager token), meshd where
/// [`MeshdOn`] says, the lab's files in `dir`, the binaries (`mesh-control`, `meshd`, `meshctl`)
/// in `bin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Topology {
    /// Starts every namespace's name: unique per lab on a machine (see [`unique_prefix`]).
    pub prefix: String,
    /// The underlay: host `i` is the subnet's address `10 + i`.
    pub subnet: Ipv4Net,
    pub hosts: usize,
    pub managers: usize,
    pub meshd: MeshdOn,
    /// Appended to every `mesh-control run` and `join` (e.g. `--key-rotation 6s`).
    #[serde(default)]
    pub manager_args: Vec<String>,
    /// Appended to every `meshd join` (e.g. `--spec-key FILE`).
    #[serde(default)]
    pub join_args: Vec<String>,
    /// Arguments every `meshd run` is given besides the lab's own.
    #[serde(default)]
    pub meshd_args: Vec<String>,
    /// The lab's state directories, logs and record; made by the lab, removed with it.
    pub dir: PathBuf,
    pub bin: PathBuf,
    /// The lab outlives the process that made it: its processes run in their own process group,
    /// dropping the [`Lab`](super::Lab) leaves everything up, and [`Lab::down`](super::Lab::down)
    /// removes it (what `meshctl lab up` makes). Otherwise the lab goes when dropped (tests).
    #[serde(default)]
    pub persistent: bool,
}

impl Topology {
    /// `hosts` hosts named `prefix-hI` on [`DEFAULT_SUBNET`], one manager, meshd on every host,
    /// removed when dropped.
    pub fn new(
        prefix: impl Into<String>,
        hosts: usize,
        dir: impl Into<PathBuf>,
        bin: impl Into<PathBuf>,
    ) -> Self {
        Topology {
            prefix: prefix.into(),
            subnet: DEFAULT_SUBNET.parse().expect("the default subnet is valid"),
            hosts,
            managers: 1,
            meshd: MeshdOn::Every,
            manager_args: Vec::new(),
            join_args: Vec::new(),
            meshd_args: Vec::new(),
            dir: dir.into(),
            bin: bin.into(),
            persistent: false,
        }
    }

    /// Checks every value; the error names the value and what is allowed.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |m: String| Err(LabError::Topology(m));
        let p = &self.prefix;
        let mut chars = p.chars();
        if !(chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
            && p.len() <= MAX_PREFIX)
        {
            return bad(format!(
                "prefix `{p}`: a lowercase letter, then lowercase letters and digits, at most {MAX_PREFIX}"
            ));
        }
        let room = 2u64.pow(32 - u32::from(self.subnet.prefix_len())).saturating_sub(2);
        let max = (MAX_HOSTS as u64).min(room.saturating_sub(u64::from(HOST_OFFSET))) as usize;
        if !(1..=max).contains(&self.hosts) {
            return bad(format!("{} hosts: between 1 and {max} on {}", self.hosts, self.subnet));
        }
        if !(1..=self.hosts).contains(&self.managers) {
            return bad(format!("{} managers: between 1 and the hosts ({})", self.managers, self.hosts));
        }
        if self.meshd_hosts().next().is_none() {
            return bad(format!("meshd only on hosts without a manager, and all {} have one", self.hosts));
        }
        Ok(())
    }

    /// Host `i`'s namespace (1-based).
    pub fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// The namespace holding the underlay bridge (`br0`; host `i`'s veth is `vI` there).
    pub fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Host `i`'s underlay address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.network()) + HOST_OFFSET + i as u32)
    }

    /// Where host `i`'s manager listens: `addr:7400`.
    pub fn control(&self, i: usize) -> String {
        format!("{}:{CONTROL_PORT}", self.addr(i))
    }

    /// The host whose manager listens at `control` (as `meshctl node ls` shows it).
    pub fn host_of_control(&self, control: &str) -> Option<usize> {
        (1..=self.hosts).find(|i| self.control(*i) == control)
    }

    /// The hosts running meshd.
    pub fn meshd_hosts(&self) -> std::ops::RangeInclusive<usize> {
        let first = match self.meshd {
            MeshdOn::Every => 1,
            MeshdOn::Workers => self.managers + 1,
        };
        first..=self.hosts
    }

    /// The state directory of host `i`'s manager; h1's holds the admin bundle.
    pub fn manager_dir(&self, i: usize) -> PathBuf {
        if i == 1 { self.dir.join("control") } else { self.dir.join(format!("control-h{i}")) }
    }

    /// The admin bundle (`MESHCTL_ADMIN`), made by the first manager's init (outside any
    /// manager's state directory, as on real hosts).
    pub fn admin_dir(&self) -> PathBuf {
        self.dir.join("admin")
    }

    /// The state directory of host `i`'s meshd.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}"))
    }

    /// Where `program` on host `i` logs (stdout and stderr, appended across restarts).
    pub fn log(&self, program: Program, i: usize) -> PathBuf {
        match program {
            Program::Manager => self.dir.join(format!("control-h{i}.log")),
            Program::Meshd => self.dir.join(format!("meshd-h{i}.log")),
        }
    }

    /// The namespace of `service`'s endpoint `slot` on host `i` (meshd's `--netns-prefix` is
    /// the host's name).
    pub fn workload(&self, i: usize, service: &str, slot: u32) -> String {
        format!("{}-{service}-{slot}", self.host(i))
    }

    /// The path of a binary the lab runs.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }
}

/// A prefix unique on this machine for a run: `stem`, this process's ID and a random part, so
/// labs made at once by several processes, or several in one, do not share names.
pub fn unique_prefix(stem: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // The counter (any width) before the random part (always three digits) keeps two prefixes of
    // one process apart.
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{stem}{}{n:x}{:03x}", std::process::id() % 100_000, nanos % 0xfff)
}

/// `dir`'s record of the lab.
pub(super) fn record_path(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

/// `dir`'s record of the lab for shell scripts.
pub(super) fn env_path(dir: &Path) -> PathBuf {
    dir.join("lab.env")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(prefix: &str, hosts: usize) -> Topology {
        Topology::new(prefix, hosts, "/tmp/lab", "/bin")
    }

    #[test]
    fn names_addresses_and_paths_follow_the_prefix_and_subnet() {
        let mut t = topology("t123abc", 3);
        t.subnet = "10.99.0.0/24".parse().unwrap();
        assert_eq!(t.host(2), "t123abc-h2");
        assert_eq!(t.bridge(), "t123abc-br");
        assert_eq!(t.addr(1).to_string(), "10.99.0.11");
        assert_eq!(t.control(3), "10.99.0.13:7400");
        assert_eq!(t.host_of_control("10.99.0.12:7400"), Some(2));
        assert_eq!(t.host_of_control("10.77.0.12:7400"), None);
        assert_eq!(t.workload(3, "api", 1), "t123abc-h3-api-1");
        assert_eq!(t.manager_dir(1), Path::new("/tmp/lab/control"));
        assert_eq!(t.manager_dir(2), Path::new("/tmp/lab/control-h2"));
        assert_eq!(t.admin_dir(), Path::new("/tmp/lab/admin"));
        assert_eq!(t.node_dir(2), Path::new("/tmp/lab/h2"));
    }

    #[test]
    fn meshd_runs_on_every_host_or_on_those_without_a_manager() {
        let mut t = topology("lab", 5);
        t.managers = 3;
        assert_eq!(t.meshd_hosts().collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        t.meshd = MeshdOn::Workers;
        assert_eq!(t.meshd_hosts().collect::<Vec<_>>(), [4, 5]);
    }

    #[test]
    fn bad_values_are_refused_naming_what_is_allowed() {
        for (prefix, hosts, managers, meshd, subnet, says) in [
            ("Lab", 3, 1, MeshdOn::Every, "10.77.0.0/24", "prefix `Lab`"),
            ("a-b", 3, 1, MeshdOn::Every, "10.77.0.0/24", "prefix `a-b`"),
            ("", 3, 1, MeshdOn::Every, "10.77.0.0/24", "prefix ``"),
            ("lab", 0, 1, MeshdOn::Every, "10.77.0.0/24", "0 hosts: between 1 and 50"),
            ("lab", 51, 1, MeshdOn::Every, "10.77.0.0/24", "51 hosts"),
            ("lab", 10, 1, MeshdOn::Every, "10.77.0.0/28", "between 1 and 4 on 10.77.0.0/28"),
            ("lab", 3, 4, MeshdOn::Every, "10.77.0.0/24", "4 managers"),
            ("lab", 3, 3, MeshdOn::Workers, "10.77.0.0/24", "all 3 have one"),
        ] {
            let mut t = topology(prefix, hosts);
            t.managers = managers;
            t.meshd = meshd;
            t.subnet = subnet.parse().unwrap();
            let e = t.validate().expect_err(says).to_string();
            assert!(e.contains(says), "{e} (expected: {says})");
        }
        let mut t = topology("t12345fff", 50);
        t.managers = 3;
        t.validate().unwrap();
    }

    #[test]
    fn unique_prefixes_differ_within_a_process_and_are_valid() {
        let (a, b) = (unique_prefix("t"), unique_prefix("t"));
        assert_ne!(a, b);
        topology(&a, 2).validate().unwrap();
    }
}
