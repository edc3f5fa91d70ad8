//! Accepting connections without being exhausted by them, for every listener of both daemons:
//! quotas of connections in all and per source address ([`Admission`]), accept errors (out of
//! file descriptors, say) waited out with a backoff instead of spinning or ending the loop
//! ([`AcceptBackoff`]), and refusals logged at most once per interval.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

/// How many connections one quota admits, in all and from one source address.
#[derive(Clone, Copy, Debug)]
pub struct Quota {
    pub total: usize,
    pub per_source: usize,
}

/// Counts what a [`Quota`] admitted; a [`Permit`] gives its place back when dropped.
#[derive(Debug)]
pub struct Admission {
    quota: Quota,
    used: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Admission {
    pub fn new(quota: Quota) -> Arc<Admission> {
        Arc::new(Admission { quota, used: Mutex::new((0, HashMap::new())) })
    }

    /// A place for a connection from `source`, if the quota has one.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Option<Permit> {
        let mut used = self.used.lock().expect("lock");
        let (total, by_source) = &mut *used;
        let mine = by_source.entry(source).or_default();
        if *total >= self.quota.total || *mine >= self.quota.per_source {
            if *mine == 0 {
                by_source.remove(&source);
            }
            return None;
        }
        *total += 1;
        *mine += 1;
        Some(Permit { admission: self.clone(), source })
    }
}

/// One admitted connection.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut used = self.admission.used.lock().expect("lock");
        let (total, by_source) = &mut *used;
        *total -= 1;
        if let Some(mine) = by_source.get_mut(&self.source) {
            *mine -= 1;
            if *mine == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// Refusals of connections over a limit, logged at most once per interval.
static REFUSED: AtomicU64 = AtomicU64::new(0);
static LAST_REFUSAL_LOG: Mutex<Option<Instant>> = Mutex::new(None);

pub fn refused(what: &str, peer: SocketAddr) {
    let count = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    let mut last = LAST_REFUSAL_LOG.lock().expect("lock");
    if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
        *last = Some(Instant::now());
        warn!(%peer, refused = count, "refusing a connection: {what} (logged once per {LOG_EVERY:?})");
    }
}

/// How often a flood of refusals is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Waits out accept errors: 10 ms after the first, doubling to 1 s, logged once per interval.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    logged: Option<Instant>,
}

impl Default for AcceptBackoff {
    fn default() -> AcceptBackoff {
        AcceptBackoff { delay: MIN_BACKOFF, logged: None }
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl AcceptBackoff {
    /// After an accept error on `listener`: waits, longer each time until [`Self::reset`].
    pub async fn wait(&mut self, listener: &str, error: &std::io::Error) {
        if self.logged.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.logged = Some(Instant::now());
            warn!(%error, listener, "accepting a connection failed; backing off (logged once per {LOG_EVERY:?})");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }

    /// After a connection was accepted.
    pub fn reset(&mut self) {
        self.delay = MIN_BACKOFF;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quota_counts_in_all_and_per_source_and_gives_places_back() {
        let admission = Admission::new(Quota { total: 3, per_source: 2 });
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = admission.admit(a).unwrap();
        let _second = admission.admit(a).unwrap();
        assert!(admission.admit(a).is_none(), "per source");
        let _third = admission.admit(b).unwrap();
        assert!(admission.admit(b).is_none(), "in all");
        drop(first);
        assert!(admission.admit(a).is_some(), "a place given back");
    }
}
