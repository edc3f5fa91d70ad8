//! What this node's endpoints are doing, as meshd reports it to control (`meshctl service ps`):
//! each one's state, restarts, since when, and how its command last ended. The workloads write
//! it; the session sends it whole whenever it changes, and once on every connection.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_api::model::{EndpointState, RunState};
use tokio::sync::watch;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The states of this node's endpoints, by (service, slot).
pub struct Endpoints(watch::Sender<BTreeMap<(String, u32), EndpointState>>);

impl Endpoints {
    pub fn new() -> Arc<Endpoints> {
        Arc::new(Endpoints(watch::channel(BTreeMap::new()).0))
    }

    /// Told of every change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<(String, u32), EndpointState>> {
        self.0.subscribe()
    }

    /// The handle through which endpoint `service`.`slot` reports; it leaves the report when
    /// dropped.
    pub fn endpoint(self: &Arc<Endpoints>, service: &str, slot: u32) -> Endpoint {
        let endpoint = Endpoint { endpoints: self.clone(), key: (service.to_owned(), slot) };
        endpoint.set(RunState::Starting, None, false);
        endpoint
    }

    /// An endpoint that could not be built at all (its workload never started).
    pub fn failed(&self, service: &str, slot: u32, why: String) {
        let key = (service.to_owned(), slot);
        self.0.send_if_modified(|all| {
            let restarts = all.get(&key).map_or(0, |e| e.restarts);
            let changed = all
                .get(&key)
                .is_none_or(|e| e.state != RunState::Failed || e.last_exit.as_ref() != Some(&why));
            if changed {
                all.insert(key.clone(), state(&key, RunState::Failed, restarts, Some(why)));
            }
            changed
        });
    }

    /// Forgets endpoints no longer placed here.
    pub fn retain(&self, keep: impl Fn(&str, u32) -> bool) {
        self.0.send_if_modified(|all| {
            let before = all.len();
            all.retain(|(service, slot), _| keep(service, *slot));
            all.len() != before
        });
    }
}

fn state(key: &(String, u32), state: RunState, restarts: u32, last_exit: Option<String>) -> EndpointState {
    EndpointState { service: key.0.clone(), slot: key.1, state, restarts, since: now(), last_exit }
}

/// One endpoint's reporting handle.
pub struct Endpoint {
    endpoints: Arc<Endpoints>,
    key: (String, u32),
}

impl Endpoint {
    /// Records `state`; `restarted` counts one more start; `last_exit` replaces the one held
    /// when given.
    pub fn set(&self, state_now: RunState, last_exit: Option<String>, restarted: bool) {
        self.endpoints.0.send_modify(|all| {
            let held = all.get(&self.key);
            let restarts = held.map_or(0, |e| e.restarts) + u32::from(restarted);
            let last_exit = last_exit.or_else(|| held.and_then(|e| e.last_exit.clone()));
            all.insert(self.key.clone(), state(&self.key, state_now, restarts, last_exit));
        });
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.endpoints.0.send_modify(|all| {
            all.remove(&self.key);
        });
    }
}

/// How a command ended, in a few words.
pub fn exit_text(status: &std::io::Result<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => "ended".into(),
        },
        Err(e) => format!("cannot wait for it: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_reports_its_states_and_restarts_and_leaves_when_dropped() {
        let endpoints = Endpoints::new();
        let mut seen = endpoints.subscribe();
        let e = endpoints.endpoint("api", 1);
        assert_eq!(seen.borrow_and_update()[&("api".into(), 1)].state, RunState::Starting);
        e.set(RunState::Running, None, false);
        e.set(RunState::Restarting, Some("exit 3".into()), true);
        e.set(RunState::Running, None, false);
        let now = seen.borrow_and_update()[&("api".into(), 1)].clone();
        assert_eq!(
            (now.state, now.restarts, now.last_exit.as_deref()),
            (RunState::Running, 1, Some("exit 3"))
        );
        drop(e);
        assert!(seen.has_changed().unwrap());
        assert!(seen.borrow_and_update().is_empty());
        endpoints.failed("db", 2, "no user `x` on this node".into());
        assert_eq!(seen.borrow_and_update()[&("db".into(), 2)].state, RunState::Failed);
        endpoints.failed("db", 2, "no user `x` on this node".into());
        assert!(!seen.has_changed().unwrap(), "the same failure again is no change");
        endpoints.retain(|_, _| false);
        assert!(seen.borrow_and_update().is_empty());
    }
}
