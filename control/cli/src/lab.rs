//! The lab: a local cluster in network namespaces, as root. One implementation of its topology,
//! used by `meshctl lab`, the end-to-end tests (`tests/`) and, through `meshctl lab up --bare`,
//! the benchmark and tour scripts.
//!
//! ```text
//!   P-br       br0 ─┬─ v1 ────────── v2 ────────── … ── vN        the underlay: a bridge in a
//!                   │                │                   │        namespace of its own
//!   P-h1     eth0 10.77.0.11   P-h2 eth0 .12      P-hN eth0 .(10+N)
//!            mesh-control           meshd               meshd      managers on h1..hM; meshd on
//!            (meshd)                └ P-h2-web-1        └ …        every host or on the others
//! ```
//!
//! Every name starts with the lab's prefix `P` (unique per run, so labs and tests run side by
//! side), and the lab removes what it made: its processes, its namespaces (the workload
//! namespaces meshd made under `P-hI-` included) and its directory. Its underlay subnet lives
//! only in its own namespaces, so no two labs ever see each other's addresses; each user still
//! has its own (`meshctl lab` 10.77.0.0/24, the tour 10.76, the benchmarks 10.98, the tests
//! 10.99), so an address in a log says whose lab it was.
//!
//! - [`Topology`] says what to build: prefix, subnet, hosts, managers, where meshd runs, where the
//!   lab keeps its files and where the binaries are. Names, addresses and paths come from it.
//! - [`Lab`] builds a topology, runs the binaries in it (spawned by path, never linked), offers
//!   what the tests and `meshctl lab` do with a lab, and tears it down: on drop, or with
//!   [`Lab::down`] for a persistent lab (one recorded in `DIR/lab.json`, reopened by
//!   [`Lab::open`]); `DIR/lab.env` says the same to a shell script.
//! - `meshctl lab up|exec|status|down` ([`up`], [`exec`], [`status`], [`down`]): a lab from a
//!   spec (networks, services, a policy, checks), checked as a user would, left running.

mod cli;
mod cluster;
mod process;
mod record;
mod spec;
mod topology;

use std::path::PathBuf;

pub use cli::{DEFAULT_DIR, UpOptions, down, exec, status, up};
pub use cluster::{Lab, Removed, sweep};
pub use process::{require_root, wait};
pub use record::{Process, Program};
pub use topology::{
    CONTROL_PORT, DEFAULT_PREFIX, DEFAULT_SUBNET, MAX_HOSTS, MeshdOn, Topology, unique_prefix,
};

/// What can go wrong building, running or removing a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab makes network namespaces: run it as root (sudo)")]
    NotRoot,
    /// A topology value out of range: the message names the value and what is allowed.
    #[error("{0}")]
    Topology(String),
    #[error("{} is missing: build it (cargo build --release)", .0.display())]
    MissingBinary(PathBuf),
    #[error("a lab is already up (state in {}): `meshctl lab down` first", .0.display())]
    AlreadyUp(PathBuf),
    #[error("namespaces named {0}-* exist already: `meshctl lab down` removes them")]
    NamespacesExist(String),
    #[error("no lab in {} (start one with `meshctl lab up`)", .0.display())]
    NoLab(PathBuf),
    #[error("{} is not a lab's record: {source}", path.display())]
    Record { path: PathBuf, source: serde_json::Error },
    #[error("cannot run {program} (is it installed?): {source}")]
    Spawn { program: String, source: std::io::Error },
    /// A command that ran and failed: the command line and what it said.
    #[error("{command}: {output}")]
    Failed { command: String, output: String },
    #[error("{what} (logs in {})", dir.display())]
    Timeout { what: String, dir: PathBuf },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// An answer the lab could not read (meshctl's JSON, a certificate).
    #[error("{what}: {detail}")]
    Unreadable { what: String, detail: String },
    #[error("{host} runs no {program}")]
    NotRunning { host: String, program: Program },
}
