//! Changing a running service: `service update` (replicas, constraints and ports at once; its
//! command and how it runs as a new version), `service rollback`, and the rolling update that
//! hands a new version to the endpoints a batch at a time.
//!
//! An endpoint runs one version of its service's definition (`Endpoint::version`); the slicer
//! sends its node that version, and meshd rebuilds a workload whose definition changed. A batch is
//! handed out once every endpoint at the new version is up (and has been for `monitor_secs`, by
//! its node's report), and `delay_secs` after that. An endpoint of the new version that fails
//! (cannot be built, or its command exits) stops the update: it pauses, or rolls back.

use std::collections::BTreeSet;

use mesh_api::ids::NodeId;
use mesh_api::model::{DefinitionChange, EndpointState, PortSpec, RunState};

use super::{Liveness, PlanError, place};
use crate::planning::placement::Constraint;
use crate::state::{ClusterState, Command, Definition, Endpoint, OnFailure, Rollout, RolloutState, Service};
use mesh_api::specs::SignedSpec;

/// What node `.0` last reported of endpoint `.1`.`.2`.
pub type Reported<'a> = dyn Fn(&NodeId, &str, u32) -> Option<EndpointState> + 'a;

/// How a rolling update goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpdateOptions {
    /// Endpoints per batch (0: all at once).
    pub parallelism: u32,
    pub delay_secs: u64,
    pub monitor_secs: u64,
    pub on_failure: OnFailure,
}

/// One endpoint at a time, the next as soon as the last has run 5 s; pause on a failure.
impl Default for UpdateOptions {
    fn default() -> UpdateOptions {
        UpdateOptions { parallelism: 1, delay_secs: 0, monitor_secs: 5, on_failure: OnFailure::Pause }
    }
}

/// Longest wait between batches, and longest an endpoint is watched.
pub const MAX_UPDATE_SECS: u64 = 24 * 3600;
/// How long an endpoint handed a version may take to report it (its node may be unreachable, or
/// run a meshd that reports no versions): longer fails the update.
pub const REPORT_WITHIN_SECS: i64 = 60;

impl UpdateOptions {
    fn check(&self) -> Result<(), PlanError> {
        if self.delay_secs > MAX_UPDATE_SECS || self.monitor_secs > MAX_UPDATE_SECS {
            return Err(PlanError::Run(format!(
                "an update's delay and monitor are at most {MAX_UPDATE_SECS} s (a day)"
            )));
        }
        Ok(())
    }
}

/// What `service update` changes; what is left empty stays as it is.
#[derive(Clone, Debug, Default)]
pub struct ServiceUpdate {
    /// Its command and how it runs.
    pub definition: DefinitionChange,
    pub replicas: Option<u32>,
    pub constraint_add: Vec<String>,
    pub constraint_rm: Vec<String>,
    pub port_add: Vec<PortSpec>,
    pub port_rm: Vec<PortSpec>,
    /// Published ports added (`[MODE:]PUBLISHED:TARGET[/PROTO]`) and removed (by published port).
    pub publish_add: Vec<String>,
    pub publish_rm: Vec<u16>,
    /// A new version even when the definition is the same: every endpoint is restarted.
    pub force: bool,
    /// The operator's signature of the new definition (it must say what the update makes).
    pub signed: Option<SignedSpec>,
    /// Whether a change of a signed service's definition may go unsigned.
    pub unsigned: bool,
    pub options: UpdateOptions,
}

/// The new definition: `definition` with `update`'s changes (and its signature, to be replaced).
fn changed(definition: &Definition, update: &ServiceUpdate) -> Result<Definition, PlanError> {
    let (command, run) =
        update.definition.apply(&definition.command, &definition.run).map_err(PlanError::Run)?;
    Ok(Definition { command, run, signed: definition.signed.clone() })
}

/// Whether `signed` (read, not verified: control holds no key) says what `definition` of
/// service `name` on `networks` is, in this cluster, with these secrets; nodes verify the
/// signature itself.
pub(super) fn check_signed(
    state: &ClusterState,
    signed: &SignedSpec,
    name: &str,
    definition: &Definition,
    networks: &[String],
) -> Result<(), PlanError> {
    let wrong = |e: String| PlanError::Run(format!("the signed spec is not what the service would run: {e}"));
    let document = signed.read().map_err(|e| PlanError::Run(e.to_string()))?;
    if document.cluster != state.cluster_id.as_str() {
        return Err(wrong(format!("it is for cluster {}, not {}", document.cluster, state.cluster_id)));
    }
    document
        .matches(name, &definition.command, &definition.run, &networks.iter().cloned().collect())
        .map_err(|e| wrong(e.to_string()))?;
    for (secret, digest) in &document.secrets {
        if state.secrets.get(secret).is_some_and(|s| &s.digest != digest) {
            return Err(wrong(format!("secret `{secret}` holds other bytes than those signed")));
        }
    }
    Ok(())
}

/// Whether nodes that admitted `current`'s signed spec start `next` (their own record decides:
/// they may have seen a newer one). Unsigned versions are the nodes' to refuse.
fn allowed_after(current: &Definition, next: &SignedSpec) -> bool {
    current.signed.as_ref().is_none_or(|c| mesh_api::specs::allowed_after(c, next))
}

/// Ports and constraints with `update`'s changes.
fn reshape(service: &mut Service, update: &ServiceUpdate) -> Result<(), PlanError> {
    let same =
        |a: &PortSpec, b: &PortSpec| a.port == b.port && a.protocol.transport() == b.protocol.transport();
    for port in &update.port_rm {
        if !service.ports.iter().any(|p| same(p, port)) {
            return Err(PlanError::Run(format!("the service has no port {}", port_text(port))));
        }
        service.ports.retain(|p| !same(p, port));
    }
    for port in &update.port_add {
        if service.ports.iter().any(|p| same(p, port)) {
            return Err(PlanError::DuplicatePort(port_text(port)));
        }
        service.ports.push(*port);
    }
    for published in &update.publish_rm {
        if !service.publish.iter().any(|p| p.published == *published) {
            return Err(PlanError::Run(format!("the service publishes no port {published}")));
        }
        service.publish.retain(|p| p.published != *published);
    }
    let added = super::publish::resolve(&update.publish_add, &service.ports)?;
    for p in added {
        if service.publish.iter().any(|q| q.published == p.published) {
            return Err(PlanError::Run(format!("published port {} is listed twice", p.published)));
        }
        service.publish.push(p);
    }
    // What is published still leads to a port of the service, with the same protocol.
    for p in &service.publish {
        if !service.ports.iter().any(|q| q.port == p.target && q.protocol == p.protocol) {
            return Err(PlanError::Run(format!(
                "port {} is published ({p}): remove it with --publish-rm {} first",
                p.target, p.published
            )));
        }
    }
    for text in &update.constraint_rm {
        let gone: Constraint = text.parse()?;
        if !service.constraints.contains(&gone) {
            return Err(PlanError::Run(format!("the service has no constraint `{text}`")));
        }
        service.constraints.retain(|c| *c != gone);
    }
    for text in &update.constraint_add {
        let new: Constraint = text.parse()?;
        if !service.constraints.contains(&new) {
            service.constraints.push(new);
        }
    }
    if let Some(replicas) = update.replicas {
        if replicas > super::MAX_REPLICAS {
            return Err(PlanError::Replicas(replicas));
        }
        service.replicas = replicas;
    }
    Ok(())
}

fn port_text(p: &PortSpec) -> String {
    format!("{}/{:?}", p.port, p.protocol).to_lowercase()
}

/// A number no version of `service` has.
fn next_version(service: &Service) -> u64 {
    let highest = service
        .earlier
        .keys()
        .copied()
        .chain(service.previous)
        .chain(service.endpoints.values().map(|e| e.version));
    highest.fold(service.version, u64::max) + 1
}

/// Makes `definition` the service's current version (the one it had becomes the one a rollback
/// returns to) and starts rolling it out.
fn start(
    service: &mut Service,
    version: u64,
    definition: Definition,
    options: UpdateOptions,
    rollback: bool,
    now: i64,
) {
    let before = Definition {
        command: service.command.take(),
        run: std::mem::take(&mut service.run),
        signed: service.signed.take(),
    };
    service.earlier.insert(service.version, before);
    service.previous = Some(service.version);
    service.earlier.remove(&version);
    service.version = version;
    service.command = definition.command;
    service.run = definition.run;
    service.signed = definition.signed;
    service.rollout = Some(Rollout {
        parallelism: options.parallelism,
        delay_secs: options.delay_secs,
        monitor_secs: options.monitor_secs,
        // A rollback that fails too stops where it is.
        on_failure: if rollback { OnFailure::Pause } else { options.on_failure },
        rollback,
        state: RolloutState::Updating,
        started_at: now,
        batch_at: now,
        next_at: Some(now),
        failure: None,
    });
}

/// `service update NAME`: replicas, constraints and ports change at once; a changed command or
/// run spec becomes a new version rolled out to the endpoints. On a paused update, no change
/// resumes it.
pub fn update_service(
    state: &ClusterState,
    name: &str,
    update: &ServiceUpdate,
    live: &Liveness,
    report: &Reported<'_>,
    now: i64,
) -> Result<Vec<Command>, PlanError> {
    update.options.check()?;
    let mut service =
        state.services.get(name).cloned().ok_or_else(|| PlanError::UnknownService(name.to_owned()))?;
    let current = service.definition(service.version);
    let mut definition = changed(&current, update)?;
    reshape(&mut service, update)?;
    super::publish::check_free(state, name, &service.publish)?;
    let differs = (&definition.command, &definition.run) != (&current.command, &current.run);
    match &update.signed {
        Some(signed) => {
            check_signed(state, signed, name, &definition, &service.networks)?;
            if !allowed_after(&current, signed) {
                return Err(PlanError::Run(format!(
                    "the signed spec is older than the one service `{name}` runs and not the one that rolls back to: nodes that saw the current one refuse it as a replay (sign the change again)"
                )));
            }
            definition.signed = Some(signed.clone());
        }
        None if differs && current.signed.is_some() && !update.unsigned => {
            return Err(PlanError::Run(format!(
                "service `{name}`'s spec is signed: sign the change (meshctl --spec-key FILE), or pass --unsigned (nodes that pin the operator's key will not run it)"
            )));
        }
        // What the operator signed is not what runs any more.
        None if differs => definition.signed = None,
        None => {}
    }
    if definition != current || update.force {
        let version = next_version(&service);
        start(&mut service, version, definition, update.options, false, now);
    } else if let Some(r) = service.rollout.as_mut()
        && matches!(r.state, RolloutState::Paused(_))
    {
        // Restarts from before count no more.
        r.state = RolloutState::Updating;
        r.next_at = Some(now);
        r.started_at = now;
        r.batch_at = now;
    }
    let mut service = place(state, service, live, true)?;
    advance(&mut service, &|e| report(&e.node, name, e.slot), now);
    Ok(if Some(&service) == state.services.get(name) {
        vec![]
    } else {
        vec![Command::PutService(Box::new(service))]
    })
}

/// `service rollback NAME`: the version before becomes the current one again, rolled out like an
/// update; endpoints that still run it are left as they are.
pub fn rollback_service(
    state: &ClusterState,
    name: &str,
    options: UpdateOptions,
    report: &Reported<'_>,
    now: i64,
) -> Result<Vec<Command>, PlanError> {
    options.check()?;
    let mut service =
        state.services.get(name).cloned().ok_or_else(|| PlanError::UnknownService(name.to_owned()))?;
    rollback(&mut service, options, now)?;
    advance(&mut service, &|e| report(&e.node, name, e.slot), now);
    Ok(vec![Command::PutService(Box::new(service))])
}

fn rollback(service: &mut Service, options: UpdateOptions, now: i64) -> Result<(), PlanError> {
    let previous = service.previous.ok_or_else(|| {
        PlanError::Run(format!("service `{}` has no version before this one to roll back to", service.name))
    })?;
    let definition = service.definition(previous);
    if let Some(signed) = &definition.signed
        && !allowed_after(&service.definition(service.version), signed)
    {
        return Err(PlanError::Run(format!(
            "the signed spec of version {previous} is older than the current one's and not the one it rolls back to: nodes refuse it as a replay (update the service with the spec-signing key instead)"
        )));
    }
    start(service, previous, definition, options, true, now);
    Ok(())
}

/// Each running update's next step, as the endpoints' reports stand: a batch handed out, a pause,
/// a rollback, or its end.
pub fn roll_out(state: &ClusterState, report: &Reported<'_>, now: i64) -> Vec<Command> {
    let mut commands = Vec::new();
    for service in state.services.values() {
        let mut next = service.clone();
        let report = |e: &Endpoint| report(&e.node, &service.name, e.slot);
        if advance(&mut next, &report, now) {
            commands.push(Command::PutService(Box::new(next)));
        }
    }
    commands
}

/// One step of `service`'s update; whether it changed.
fn advance(service: &mut Service, report: &dyn Fn(&Endpoint) -> Option<EndpointState>, now: i64) -> bool {
    let Some(rollout) = service.rollout.clone() else { return false };
    if rollout.state != RolloutState::Updating {
        return false;
    }
    let version = service.version;
    // Endpoints given this version and not yet up for long enough, and the first that failed.
    let mut waiting = false;
    for e in service.endpoints.values().filter(|e| e.version == version) {
        let Some(r) = report(e).filter(|r| r.version == version) else {
            if now - rollout.batch_at > REPORT_WITHIN_SECS {
                let message = format!(
                    "{}.{} on node {} did not report running version {version} within {REPORT_WITHIN_SECS} s",
                    service.name, e.slot, e.node
                );
                fail(service, &rollout, report, message, now);
                return true;
            }
            waiting = true;
            continue;
        };
        // Exited or unable to start; or exited and started again since the update began (its
        // node may report the new start before control saw the exit).
        let restarted = r.restarts > 0 && r.since >= rollout.started_at;
        if matches!(
            r.state,
            RunState::Failed
                | RunState::Restarting
                | RunState::Unsigned
                | RunState::BadSignature
                | RunState::Replayed
        ) || restarted
        {
            let why = r.last_exit.unwrap_or_else(|| r.state.name().to_owned());
            let message = format!("{}.{} on node {} {}: {why}", service.name, e.slot, e.node, r.state.name());
            fail(service, &rollout, report, message, now);
            return true;
        }
        if !(r.state.up() && now - r.since >= rollout.monitor_secs as i64) {
            waiting = true;
        }
    }
    if waiting {
        return false;
    }
    let stale: Vec<u32> =
        service.endpoints.values().filter(|e| e.version != version).map(|e| e.slot).collect();
    if stale.is_empty() {
        set_state(service, RolloutState::Completed);
        service.prune();
        return true;
    }
    let due = match rollout.next_at {
        Some(at) => at,
        None => now + rollout.delay_secs as i64,
    };
    if now < due {
        let changed = rollout.next_at.is_none();
        service.rollout.as_mut().expect("a rollout").next_at = Some(due);
        return changed;
    }
    let batch = if rollout.parallelism == 0 { stale.len() } else { rollout.parallelism as usize };
    let handed: BTreeSet<u32> = stale.into_iter().take(batch).collect();
    for e in service.endpoints.values_mut().filter(|e| handed.contains(&e.slot)) {
        e.version = version;
    }
    let r = service.rollout.as_mut().expect("a rollout");
    r.batch_at = now;
    r.next_at = None;
    service.prune();
    true
}

/// The update failed: it pauses, or rolls back, as it was asked.
fn fail(
    service: &mut Service,
    rollout: &Rollout,
    report: &dyn Fn(&Endpoint) -> Option<EndpointState>,
    message: String,
    now: i64,
) {
    match rollout.on_failure {
        OnFailure::Rollback if rollback(service, options_of(rollout), now).is_ok() => {
            service.rollout.as_mut().expect("a rollout").failure = Some(message);
            advance(service, report, now);
        }
        _ => set_state(service, RolloutState::Paused(message)),
    }
}

fn options_of(r: &Rollout) -> UpdateOptions {
    UpdateOptions {
        parallelism: r.parallelism,
        delay_secs: r.delay_secs,
        monitor_secs: r.monitor_secs,
        on_failure: r.on_failure,
    }
}

fn set_state(service: &mut Service, state: RolloutState) {
    if let Some(r) = service.rollout.as_mut() {
        r.state = state;
        r.next_at = None;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use mesh_api::model::RunSpec;
    use mesh_api::specs::SpecDocument;

    fn service(replicas: u32) -> Service {
        let endpoints = (1..=replicas)
            .map(|slot| {
                let node: NodeId = format!("n{slot:024}").parse().expect("a node ID");
                (
                    slot,
                    Endpoint { slot, node, addresses: BTreeMap::new(), since: BTreeMap::new(), version: 0 },
                )
            })
            .collect();
        Service {
            name: "api".into(),
            networks: vec![],
            ports: vec![],
            publish: vec![],
            replicas,
            constraints: vec![],
            command: Some("v0".into()),
            run: RunSpec::default(),
            signed: None,
            version: 0,
            earlier: BTreeMap::new(),
            previous: None,
            rollout: None,
            vips: BTreeMap::new(),
            endpoints,
        }
    }

    /// The node's side: each endpoint runs what it was given, in `state` since `since`.
    struct Nodes {
        state: BTreeMap<u32, (RunState, i64, Option<String>)>,
    }

    impl Nodes {
        fn up(since: i64) -> Nodes {
            Nodes { state: (1..=10).map(|s| (s, (RunState::Running, since, None))).collect() }
        }

        fn report(&self, e: &Endpoint) -> Option<EndpointState> {
            let (state, since, last_exit) = self.state.get(&e.slot)?.clone();
            Some(EndpointState {
                service: "api".into(),
                slot: e.slot,
                state,
                restarts: 0,
                since,
                last_exit,
                version: e.version,
            })
        }
    }

    fn versions(s: &Service) -> Vec<u64> {
        s.endpoints.values().map(|e| e.version).collect()
    }

    fn begin(s: &mut Service, options: UpdateOptions, now: i64) {
        let definition = Definition { command: Some("v1".into()), run: RunSpec::default(), signed: None };
        start(s, 1, definition, options, false, now);
        advance(s, &|_| None, now);
    }

    #[test]
    fn a_new_version_goes_out_one_batch_at_a_time_each_once_the_last_has_stayed_up() {
        let mut s = service(3);
        begin(&mut s, UpdateOptions { monitor_secs: 5, ..UpdateOptions::default() }, 100);
        assert_eq!(versions(&s), [1, 0, 0], "the first batch at once");
        assert_eq!(s.definition(0).command.as_deref(), Some("v0"), "the old version kept while it runs");
        // Not reported at the new version yet, then up for less than the monitor period: waits.
        assert!(!advance(&mut s, &|_| None, 101));
        assert!(!advance(&mut s, &|e| Nodes::up(101).report(e), 103));
        assert_eq!(versions(&s), [1, 0, 0]);
        assert!(advance(&mut s, &|e| Nodes::up(101).report(e), 106));
        assert_eq!(versions(&s), [1, 1, 0]);
        assert!(advance(&mut s, &|e| Nodes::up(100).report(e), 120));
        assert_eq!(versions(&s), [1, 1, 1]);
        assert!(advance(&mut s, &|e| Nodes::up(100).report(e), 130));
        assert_eq!(s.rollout.as_ref().unwrap().state, RolloutState::Completed);
        assert_eq!(s.earlier.keys().collect::<Vec<_>>(), [&0], "only what a rollback returns to is kept");
        assert!(!advance(&mut s, &|e| Nodes::up(100).report(e), 140), "a finished update does nothing");
    }

    /// A signed spec as control holds it (control verifies no signature: the nodes do).
    fn signed_at(at: i64, rolls_back_to: Option<&SignedSpec>) -> SignedSpec {
        let document = SpecDocument::new("c", "api", None, RunSpec::default(), &[], BTreeMap::new(), at);
        let document = match rolls_back_to {
            Some(base) => document.rolling_back_to(base),
            None => document,
        };
        SignedSpec { document: serde_json::to_string(&document).unwrap(), signature: String::new() }
    }

    #[test]
    fn a_rollback_to_a_spec_the_current_one_replaced_is_refused() {
        // Version 2 updates version 0, which a rollback then returns to: allowed. Version 2
        // rolling back to another spec than version 0's: the nodes would refuse version 0 as a
        // replay, so control refuses to roll back (and a failed update pauses instead).
        let v0 = signed_at(200, None);
        let other = signed_at(100, None);
        for (rolls_back_to, allowed) in [(Some(&v0), true), (Some(&other), false), (None, false)] {
            let mut s = service(1);
            s.signed = Some(v0.clone());
            let definition = Definition { signed: Some(signed_at(300, rolls_back_to)), ..s.definition(0) };
            start(&mut s, 2, definition, UpdateOptions::default(), false, 100);
            let rolled = rollback(&mut s, UpdateOptions::default(), 101);
            assert_eq!(rolled.is_ok(), allowed, "{rolled:?}");
            assert_eq!(s.version, if allowed { 0 } else { 2 });
        }
        // Unsigned versions are the nodes' to refuse or run.
        let mut s = service(1);
        let definition = Definition { signed: Some(signed_at(300, None)), ..s.definition(0) };
        start(&mut s, 2, definition, UpdateOptions::default(), false, 100);
        assert!(rollback(&mut s, UpdateOptions::default(), 101).is_ok());
    }

    #[test]
    fn a_report_of_the_old_version_does_not_count_for_the_new() {
        let mut s = service(2);
        begin(&mut s, UpdateOptions { monitor_secs: 0, ..UpdateOptions::default() }, 100);
        let stale = |e: &Endpoint| Nodes::up(0).report(&Endpoint { version: 0, ..e.clone() });
        assert!(!advance(&mut s, &stale, 150));
        assert_eq!(versions(&s), [1, 0]);
        // Nothing of the new version for a minute (an unreachable node, an old meshd): failed.
        assert!(advance(&mut s, &stale, 161));
        assert!(
            matches!(&s.rollout.unwrap().state, RolloutState::Paused(why) if why.contains("did not report"))
        );
    }

    #[test]
    fn parallelism_and_delay_shape_the_batches() {
        let mut s = service(5);
        begin(
            &mut s,
            UpdateOptions { parallelism: 2, delay_secs: 10, monitor_secs: 0, ..Default::default() },
            100,
        );
        assert_eq!(versions(&s), [1, 1, 0, 0, 0]);
        let up = |e: &Endpoint| Nodes::up(100).report(e);
        assert!(advance(&mut s, &up, 101), "the delay starts once the batch is up");
        assert!(!advance(&mut s, &up, 110));
        assert_eq!(versions(&s), [1, 1, 0, 0, 0]);
        assert!(advance(&mut s, &up, 111));
        assert_eq!(versions(&s), [1, 1, 1, 1, 0]);
        let mut all = service(4);
        begin(&mut all, UpdateOptions { parallelism: 0, ..Default::default() }, 100);
        assert_eq!(versions(&all), [1, 1, 1, 1], "parallelism 0: all at once");
    }

    #[test]
    fn a_failed_endpoint_pauses_the_update_where_it_is() {
        for failing in [RunState::Restarting, RunState::Failed] {
            let mut s = service(3);
            begin(&mut s, UpdateOptions::default(), 100);
            let mut nodes = Nodes::up(100);
            nodes.state.insert(1, (failing, 101, Some("exit 3".into())));
            assert!(advance(&mut s, &|e| nodes.report(e), 102));
            let RolloutState::Paused(why) = &s.rollout.as_ref().unwrap().state else { panic!("not paused") };
            assert!(why.contains("api.1") && why.contains("exit 3"), "{why}");
            assert_eq!(versions(&s), [1, 0, 0], "nothing more handed out");
            assert!(!advance(&mut s, &|e| Nodes::up(0).report(e), 200), "a paused update stays paused");
        }
        // Seen starting again after an exit the manager never saw: a failure too; a restart from
        // before the update is not.
        let mut s = service(2);
        begin(&mut s, UpdateOptions::default(), 100);
        let restarted = |since: i64| {
            move |e: &Endpoint| {
                let mut r = Nodes::up(since).report(e)?;
                (r.state, r.restarts, r.last_exit) = (RunState::Starting, 1, Some("exit 2".into()));
                Some(r)
            }
        };
        let mut before = s.clone();
        assert!(!advance(&mut before, &restarted(90), 101));
        assert!(advance(&mut s, &restarted(101), 102));
        assert!(matches!(&s.rollout.unwrap().state, RolloutState::Paused(why) if why.contains("exit 2")));
    }

    #[test]
    fn a_failure_with_rollback_returns_every_endpoint_to_the_version_before() {
        let mut s = service(3);
        begin(
            &mut s,
            UpdateOptions { on_failure: OnFailure::Rollback, monitor_secs: 0, ..Default::default() },
            100,
        );
        assert!(advance(&mut s, &|e| Nodes::up(100).report(e), 101));
        assert_eq!(versions(&s), [1, 1, 0]);
        let mut nodes = Nodes::up(100);
        nodes.state.insert(2, (RunState::Restarting, 102, Some("exit 1".into())));
        // The node reports what each endpoint runs: slot 3 never left version 0.
        assert!(advance(&mut s, &|e| nodes.report(e), 103));
        assert_eq!(s.version, 0);
        assert_eq!(s.command.as_deref(), Some("v0"));
        assert_eq!(s.previous, Some(1));
        let r = s.rollout.clone().unwrap();
        assert!(r.rollback && r.state == RolloutState::Updating && r.on_failure == OnFailure::Pause);
        assert!(r.failure.is_some_and(|f| f.contains("api.2") && f.contains("exit 1")));
        assert_eq!(versions(&s), [0, 1, 0], "the first batch of the rollback at once");
        // Reports of version 1 no longer count: endpoints at 0 must come up again.
        assert!(advance(&mut s, &|e| Nodes::up(0).report(e), 104));
        assert_eq!(versions(&s), [0, 0, 0]);
        assert!(advance(&mut s, &|e| Nodes::up(0).report(e), 105));
        assert_eq!(s.rollout.unwrap().state, RolloutState::Completed);
    }

    #[test]
    fn an_update_on_top_of_a_running_one_takes_every_endpoint_to_the_newest() {
        let mut s = service(3);
        begin(&mut s, UpdateOptions { monitor_secs: 0, ..Default::default() }, 100);
        assert_eq!(versions(&s), [1, 0, 0]);
        let newest = Definition { command: Some("v2".into()), run: RunSpec::default(), signed: None };
        let version = next_version(&s);
        assert_eq!(version, 2);
        start(&mut s, version, newest, UpdateOptions { parallelism: 0, ..Default::default() }, false, 101);
        advance(&mut s, &|_| None, 101);
        assert_eq!(versions(&s), [2, 2, 2]);
        assert_eq!(s.command.as_deref(), Some("v2"));
        assert_eq!(s.previous, Some(1));
        assert!(advance(&mut s, &|e| Nodes::up(0).report(e), 102));
        assert_eq!(s.earlier.keys().collect::<Vec<_>>(), [&1], "version 0 is run by none and is gone");
    }

    #[test]
    fn the_definition_changes_as_asked_and_is_checked() {
        let mut d = Definition { command: Some("serve".into()), run: RunSpec::default(), signed: None };
        d.run.env = vec!["A=1".into(), "B=2".into()];
        let definition = DefinitionChange {
            env_add: vec!["A=3".into(), "C=4".into()],
            env_rm: vec!["B".into()],
            user: Some("1234".into()),
            ..Default::default()
        };
        let update = ServiceUpdate { definition, ..Default::default() };
        let next = changed(&d, &update).unwrap();
        assert_eq!(next.run.env, ["A=3", "C=4"]);
        assert_eq!(next.run.user, "1234");
        assert_eq!(next.command.as_deref(), Some("serve"));
        let change = |definition| ServiceUpdate { definition, ..Default::default() };
        let none = changed(&d, &change(DefinitionChange { command: Some(" ".into()), ..Default::default() }))
            .unwrap();
        assert_eq!(none.command, None);
        for bad in [
            DefinitionChange { env_rm: vec!["Z".into()], ..Default::default() },
            DefinitionChange { user: Some("root;rm".into()), ..Default::default() },
            DefinitionChange { env_add: vec!["NOEQUALS".into()], ..Default::default() },
            DefinitionChange { secret_rm: vec!["nope".into()], ..Default::default() },
        ] {
            assert!(changed(&d, &change(bad.clone())).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports_and_constraints_change_in_place() {
        let mut s = service(1);
        let web: PortSpec = PortSpec { port: 80, protocol: mesh_api::model::Protocol::Http };
        let tcp80 = PortSpec { port: 80, protocol: mesh_api::model::Protocol::Tcp };
        reshape(&mut s, &ServiceUpdate { port_add: vec![web], ..Default::default() }).unwrap();
        assert_eq!(s.ports, [web]);
        assert!(matches!(
            reshape(&mut s, &ServiceUpdate { port_add: vec![tcp80], ..Default::default() }),
            Err(PlanError::DuplicatePort(_))
        ));
        reshape(&mut s, &ServiceUpdate { port_rm: vec![tcp80], ..Default::default() }).unwrap();
        assert!(s.ports.is_empty());
        assert!(reshape(&mut s, &ServiceUpdate { port_rm: vec![web], ..Default::default() }).is_err());
        let zone = ServiceUpdate { constraint_add: vec!["node.labels.zone==a".into()], ..Default::default() };
        reshape(&mut s, &zone).unwrap();
        assert_eq!(s.constraints.len(), 1);
        let rm = ServiceUpdate { constraint_rm: vec!["node.labels.zone==a".into()], ..Default::default() };
        reshape(&mut s, &rm).unwrap();
        assert!(s.constraints.is_empty());
        assert!(reshape(&mut s, &rm).is_err(), "removing a constraint it does not have");
        assert!(reshape(&mut s, &ServiceUpdate { replicas: Some(5000), ..Default::default() }).is_err());
    }
}
