//! The system calls a workload is refused (a seccomp filter, installed by the helper once it is
//! the workload's user with `no_new_privs`, inherited by everything the workload runs): those
//! that would give it powers of its own or reach kernel state shared with the host. Everything
//! else is allowed: a service runs what it likes within its namespaces.
//!
//! - a user namespace of its own (`unshare` or `clone` with `CLONE_NEWUSER`; `clone3`, whose
//!   flags a filter cannot read, answers `ENOSYS` so that libc falls back to `clone`): inside
//!   one it would hold every capability over namespaces it makes, and with them the kernel's
//!   surface (nftables, mounts of many file systems) that unprivileged code never reaches;
//! - the kernel keyrings (`keyctl`, `add_key`, `request_key`): the session keyring is shared
//!   with whatever else started from meshd's session;
//! - `bpf`, `perf_event_open`, `userfaultfd`, `io_uring_*`: kernel interfaces a service does not
//!   need and attackers use to widen a kernel bug.

use std::collections::BTreeMap;
use std::io;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

const CLONE_NEWUSER: u64 = libc::CLONE_NEWUSER as u64;

/// Installs the filters on the calling thread (and so on every process it starts).
pub(super) fn restrict() -> io::Result<()> {
    for program in programs()? {
        seccompiler::apply_filter(&program).map_err(|e| io::Error::other(format!("seccomp: {e}")))?;
    }
    Ok(())
}

fn arch() -> io::Result<TargetArch> {
    std::env::consts::ARCH
        .try_into()
        .map_err(|_| io::Error::other(format!("no seccomp filter for {}", std::env::consts::ARCH)))
}

/// The two filters: calls refused with `EPERM`, and `clone3` with `ENOSYS`.
fn programs() -> io::Result<Vec<BpfProgram>> {
    let compile = |rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32| -> io::Result<BpfProgram> {
        let filter =
            SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(errno as u32), arch()?)
                .map_err(|e| io::Error::other(format!("seccomp filter: {e}")))?;
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| io::Error::other(format!("seccomp filter: {e}")))
    };
    let new_user = || -> io::Result<Vec<SeccompRule>> {
        let condition = SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_NEWUSER),
            CLONE_NEWUSER,
        )
        .map_err(|e| io::Error::other(format!("seccomp rule: {e}")))?;
        Ok(vec![
            SeccompRule::new(vec![condition]).map_err(|e| io::Error::other(format!("seccomp rule: {e}")))?,
        ])
    };
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    refused.insert(libc::SYS_unshare, new_user()?);
    refused.insert(libc::SYS_clone, new_user()?);
    for call in [
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ] {
        // No rule: refused whatever its arguments.
        refused.insert(call, vec![]);
    }
    let no_clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    Ok(vec![compile(refused, libc::EPERM)?, compile(no_clone3, libc::ENOSYS)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_machine() {
        let programs = programs().unwrap();
        assert_eq!(programs.len(), 2);
        assert!(programs.iter().all(|p| !p.is_empty()));
    }
}
