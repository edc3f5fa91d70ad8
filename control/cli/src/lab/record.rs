//! What a lab made, written down as it goes: `DIR/lab.json`, from which a lab is reopened and
//! removed, and `DIR/lab.env`, the same for a shell script to source.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::LabError;
use super::topology::{Topology, env_path, record_path};

/// A program the lab runs on its hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// `mesh-control`.
    #[serde(rename = "mesh-control")]
    Manager,
    #[serde(rename = "meshd")]
    Meshd,
}

impl Program {
    /// The binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            Program::Manager => "mesh-control",
            Program::Meshd => "meshd",
        }
    }
}

impl std::fmt::Display for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.binary())
    }
}

/// A process the lab started (and still counts as its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub host: usize,
    pub program: Program,
    pub pid: u32,
}

/// The lab's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    #[serde(flatten)]
    pub topology: Topology,
    /// Every process the lab runs, in the order started.
    pub processes: Vec<Process>,
    /// Host -> node ID of its meshd, once joined.
    #[serde(default)]
    pub node_ids: std::collections::BTreeMap<usize, String>,
}

impl Record {
    pub fn load(dir: &Path) -> Result<Record, LabError> {
        let path = record_path(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LabError::NoLab(dir.to_owned()),
            _ => LabError::Io { path: path.clone(), source: e },
        })?;
        serde_json::from_str(&text).map_err(|source| LabError::Record { path, source })
    }

    /// Writes `lab.json` and `lab.env`.
    pub fn save(&self) -> Result<(), LabError> {
        let dir = &self.topology.dir;
        let json = serde_json::to_string_pretty(self).expect("a lab's record serializes");
        write(&record_path(dir), &json)?;
        write(&env_path(dir), &self.shell())
    }

    /// The record as bash assignments (arrays indexed by host number).
    pub fn shell(&self) -> String {
        let t = &self.topology;
        let mut out = format!(
            "# The lab in {} (meshctl lab up): `. lab.env` in bash; `meshctl lab down --dir {}` removes it.\n",
            t.dir.display(),
            t.dir.display()
        );
        let mut line = |name: &str, value: &str| {
            let _ = writeln!(out, "{name}={}", quote(value));
        };
        line("LAB_DIR", &t.dir.to_string_lossy());
        line("LAB_PREFIX", &t.prefix);
        line("LAB_SUBNET", &t.subnet.to_string());
        line("LAB_HOSTS", &t.hosts.to_string());
        line("LAB_MANAGERS", &t.managers.to_string());
        line("LAB_BRIDGE", &t.bridge());
        line("LAB_CONTROL", &t.control(1));
        line("LAB_BIN", &t.bin.to_string_lossy());
        let _ = writeln!(out, "export MESHCTL_ADMIN={}", quote(&t.admin_dir().to_string_lossy()));
        let array = |name: &str, items: Vec<(usize, String)>| {
            let items: Vec<String> = items.into_iter().map(|(i, v)| format!("[{i}]={}", quote(&v))).collect();
            format!("{name}=({})\n", items.join(" "))
        };
        let all = 1..=t.hosts;
        out += &array("LAB_HOST", all.clone().map(|i| (i, t.host(i))).collect());
        out += &array("LAB_ADDR", all.map(|i| (i, t.addr(i).to_string())).collect());
        let managers = 1..=t.managers;
        out += &array(
            "LAB_MANAGER_DIR",
            managers.map(|i| (i, t.manager_dir(i).to_string_lossy().into_owned())).collect(),
        );
        out += &array(
            "LAB_NODE_DIR",
            t.meshd_hosts().map(|i| (i, t.node_dir(i).to_string_lossy().into_owned())).collect(),
        );
        out += &array("LAB_NODE_ID", self.node_ids.iter().map(|(i, id)| (*i, id.clone())).collect());
        let pids = |program: Program| -> Vec<(usize, String)> {
            self.processes
                .iter()
                .filter(|p| p.program == program)
                .map(|p| (p.host, p.pid.to_string()))
                .collect()
        };
        out += &array("LAB_MANAGER_PID", pids(Program::Manager));
        out += &array("LAB_MESHD_PID", pids(Program::Meshd));
        out
    }
}

fn write(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|source| LabError::Io { path: path.to_owned(), source })
}

/// `value` in single quotes, for a shell.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::MeshdOn;

    fn record() -> Record {
        let mut t = Topology::new("bn42", 3, "/tmp/it's", "/opt/bin");
        t.meshd = MeshdOn::Workers;
        t.subnet = "10.98.0.0/24".parse().unwrap();
        Record {
            topology: t,
            processes: vec![
                Process { host: 1, program: Program::Manager, pid: 10 },
                Process { host: 2, program: Program::Meshd, pid: 20 },
            ],
            node_ids: [(2, "abc".to_owned())].into(),
        }
    }

    #[test]
    fn the_record_reads_back_as_written() {
        let r = record();
        let back: Record = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.topology.prefix, "bn42");
        assert_eq!(back.topology.meshd, MeshdOn::Workers);
        assert_eq!(back.processes, r.processes);
        assert_eq!(back.node_ids, r.node_ids);
    }

    #[test]
    fn the_shell_record_quotes_values_and_indexes_arrays_by_host() {
        let sh = record().shell();
        for want in [
            "LAB_DIR='/tmp/it'\\''s'\n",
            "LAB_CONTROL='10.98.0.11:7400'\n",
            "export MESHCTL_ADMIN='/tmp/it'\\''s/admin'\n",
            "LAB_HOST=([1]='bn42-h1' [2]='bn42-h2' [3]='bn42-h3')\n",
            "LAB_ADDR=([1]='10.98.0.11' [2]='10.98.0.12' [3]='10.98.0.13')\n",
            "LAB_NODE_DIR=([2]='/tmp/it'\\''s/h2' [3]='/tmp/it'\\''s/h3')\n",
            "LAB_NODE_ID=([2]='abc')\n",
            "LAB_MANAGER_PID=([1]='10')\n",
            "LAB_MESHD_PID=([2]='20')\n",
        ] {
            assert!(sh.contains(want), "{want} not in:\n{sh}");
        }
    }
}
