//! What this node's endpoints are doing, as meshd reports it to control (`meshctl service ps`):
//! each one's state, restarts, since when, and how its command last ended. The workloads write
//! it; the session sends it whole whenever it changes, and once on every connection. And what
//! each endpoint's command wrote (`meshctl service logs`): its stdout and stderr, line by line,
//! in a bounded ring per endpoint that outlives restarts and goes with the endpoint.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::model::{EndpointState, LogLine, MAX_LOG_LINE, RunState};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// An endpoint: (service, slot).
type Key = (String, u32);

/// The states of this node's endpoints, and their output, by endpoint.
#[derive(Debug)]
pub struct Endpoints {
    states: watch::Sender<BTreeMap<Key, EndpointState>>,
    output: Mutex<HashMap<Key, Arc<Mutex<Ring>>>>,
    /// The ports this node was told to publish and whether it listens on each, reported with
    /// the states (a change wakes the same watchers).
    published: Mutex<Vec<Published>>,
}

/// A port this node publishes, as reported.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Published {
    pub port: u16,
    pub service: String,
    /// `None`: listening; else why not.
    pub error: Option<String>,
}

impl Endpoints {
    pub fn new() -> Arc<Endpoints> {
        Arc::new(Endpoints {
            states: watch::channel(BTreeMap::new()).0,
            output: Mutex::new(HashMap::new()),
            published: Mutex::new(Vec::new()),
        })
    }

    /// The last `tail` lines (0: all) of what endpoint `service`.`slot` wrote, at or after
    /// `since_millis`; `None` when this node has no such endpoint.
    pub fn logs(&self, service: &str, slot: u32, tail: usize, since_millis: i64) -> Option<Vec<LogLine>> {
        let ring = self
            .output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(service.to_owned(), slot))?
            .clone();
        let ring = ring.lock().unwrap_or_else(PoisonError::into_inner);
        let lines: Vec<&LogLine> = ring.lines.iter().filter(|l| l.at_millis >= since_millis).collect();
        let skip = if tail == 0 { 0 } else { lines.len().saturating_sub(tail) };
        Some(lines[skip..].iter().map(|l| (*l).clone()).collect())
    }

    /// Records the published ports' states; a change is reported.
    pub fn set_published(&self, now: Vec<Published>) {
        let mut held = self.published.lock().unwrap_or_else(PoisonError::into_inner);
        if *held != now {
            *held = now;
            drop(held);
            self.states.send_modify(|_| {});
        }
    }

    /// The published ports' states.
    pub fn published(&self) -> Vec<Published> {
        self.published.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Told of every change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<Key, EndpointState>> {
        self.states.subscribe()
    }

    /// The handle through which endpoint `service`.`slot`, running version `version` of its
    /// service's definition, reports; it leaves the report when dropped.
    pub fn endpoint(self: &Arc<Endpoints>, service: &str, slot: u32, version: u64) -> Endpoint {
        let key = (service.to_owned(), slot);
        let output = Arc::new(Mutex::new(Ring::default()));
        self.output.lock().unwrap_or_else(PoisonError::into_inner).insert(key.clone(), output.clone());
        let endpoint = Endpoint { endpoints: self.clone(), key, version, output };
        endpoint.set(RunState::Starting, None, false);
        endpoint
    }

    /// An endpoint whose workload was not started at version `version`: it could not be built
    /// (`Failed`), or its spec is not signed as the node requires (`Unsigned`, `BadSignature`).
    pub fn cannot_run(&self, service: &str, slot: u32, version: u64, now: RunState, why: String) {
        let key = (service.to_owned(), slot);
        self.states.send_if_modified(|all| {
            let restarts = all.get(&key).map_or(0, |e| e.restarts);
            let changed = all
                .get(&key)
                .is_none_or(|e| e.state != now || e.last_exit.as_ref() != Some(&why) || e.version != version);
            if changed {
                all.insert(key.clone(), state(&key, version, now, restarts, Some(why)));
            }
            changed
        });
    }

    /// Forgets endpoints no longer placed here.
    pub fn retain(&self, keep: impl Fn(&str, u32) -> bool) {
        self.states.send_if_modified(|all| {
            let before = all.len();
            all.retain(|(service, slot), _| keep(service, *slot));
            all.len() != before
        });
    }
}

fn state(
    key: &(String, u32),
    version: u64,
    state: RunState,
    restarts: u32,
    last_exit: Option<String>,
) -> EndpointState {
    EndpointState { service: key.0.clone(), slot: key.1, state, restarts, since: now(), last_exit, version }
}

/// One endpoint's reporting handle.
pub struct Endpoint {
    endpoints: Arc<Endpoints>,
    key: (String, u32),
    version: u64,
    output: Arc<Mutex<Ring>>,
}

impl Endpoint {
    /// Records `state`; `restarted` counts one more start; `last_exit` replaces the one held
    /// when given.
    pub fn set(&self, state_now: RunState, last_exit: Option<String>, restarted: bool) {
        self.endpoints.states.send_modify(|all| {
            let held = all.get(&self.key);
            let restarts = held.map_or(0, |e| e.restarts) + u32::from(restarted);
            let last_exit = last_exit.or_else(|| held.and_then(|e| e.last_exit.clone()));
            all.insert(self.key.clone(), state(&self.key, self.version, state_now, restarts, last_exit));
        });
    }
}

impl Endpoint {
    /// Keeps what the command writes on `pipe` (`stream`: stdout or stderr), line by line, until
    /// it closes.
    pub async fn keep_output(&self, pipe: impl tokio::io::AsyncRead + Unpin, stream: &'static str) {
        use tokio::io::AsyncBufReadExt;
        let mut reader = tokio::io::BufReader::new(pipe);
        let mut line = Vec::new();
        loop {
            line.clear();
            // Bounded: a line without an end is cut at MAX_LOG_LINE and the rest read as lines.
            let read = (&mut reader).take(MAX_LOG_LINE as u64).read_until(b'\n', &mut line).await;
            match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(line.strip_suffix(b"\n").unwrap_or(&line)).into_owned();
            let at_millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
            self.output.lock().unwrap_or_else(PoisonError::into_inner).push(LogLine {
                at_millis,
                stream: stream.to_owned(),
                text,
            });
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.endpoints.states.send_modify(|all| {
            all.remove(&self.key);
        });
        let mut rings = self.endpoints.output.lock().unwrap_or_else(PoisonError::into_inner);
        // Only this handle's ring: a newer handle of the same endpoint may hold the key.
        if rings.get(&self.key).is_some_and(|r| Arc::ptr_eq(r, &self.output)) {
            rings.remove(&self.key);
        }
    }
}

/// Most lines and bytes one endpoint's output keeps: the oldest go first.
pub const RING_LINES: usize = 2000;
pub const RING_BYTES: usize = 1 << 20;

/// One endpoint's last lines.
#[derive(Debug, Default)]
pub struct Ring {
    lines: VecDeque<LogLine>,
    bytes: usize,
}

impl Ring {
    fn push(&mut self, line: LogLine) {
        self.bytes += line.text.len();
        self.lines.push_back(line);
        while self.lines.len() > RING_LINES || self.bytes > RING_BYTES {
            let Some(old) = self.lines.pop_front() else { break };
            self.bytes -= old.text.len();
        }
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
        let e = endpoints.endpoint("api", 1, 0);
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
        endpoints.cannot_run("db", 2, 0, RunState::Failed, "no user `x` on this node".into());
        assert_eq!(seen.borrow_and_update()[&("db".into(), 2)].state, RunState::Failed);
        endpoints.cannot_run("db", 2, 0, RunState::Failed, "no user `x` on this node".into());
        assert!(!seen.has_changed().unwrap(), "the same failure again is no change");
        endpoints.retain(|_, _| false);
        assert!(seen.borrow_and_update().is_empty());
    }

    #[tokio::test]
    async fn output_is_kept_line_by_line_bounded_and_goes_with_its_endpoint() {
        let endpoints = Endpoints::new();
        let e = endpoints.endpoint("api", 1, 0);
        // Many lines, one far too long, one not UTF-8, the last without a newline.
        let mut written = Vec::new();
        for i in 0..(RING_LINES + 500) {
            written.extend_from_slice(format!("line {i}\n").as_bytes());
        }
        written.extend_from_slice(&vec![b'x'; MAX_LOG_LINE * 2 + 10]);
        written.extend_from_slice(b"\n\xff\xfe bad\nlast");
        e.keep_output(&written[..], "stderr").await;
        let all = endpoints.logs("api", 1, 0, 0).unwrap();
        assert_eq!(all.len(), RING_LINES, "the oldest went first");
        assert!(all.iter().all(|l| l.text.len() <= MAX_LOG_LINE && l.stream == "stderr"));
        assert_eq!(all.last().unwrap().text, "last");
        assert!(all[all.len() - 2].text.ends_with(" bad"));
        let tail = endpoints.logs("api", 1, 3, 0).unwrap();
        assert_eq!(tail.len(), 3);
        assert_eq!(tail[2].text, "last");
        assert!(endpoints.logs("api", 1, 0, i64::MAX).unwrap().is_empty(), "nothing since the future");
        assert!(endpoints.logs("api", 2, 0, 0).is_none());
        drop(e);
        assert!(endpoints.logs("api", 1, 0, 0).is_none(), "gone with its endpoint");
    }
}
