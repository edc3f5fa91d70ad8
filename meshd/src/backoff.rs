//! How long to wait after a failed call to control: every retrying loop (node and workload
//! certificate renewal, the session) backs off the same way.

use std::time::Duration;

/// First retry delay.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// The delay before retry number `attempt` (0-based): doubling from [`RETRY_MIN`] up to
/// [`RETRY_MAX`], with up to 25 % random jitter so that nodes that failed together do not retry
/// together.
pub fn delay(attempt: u32) -> Duration {
    let base = RETRY_MIN.saturating_mul(1u32 << attempt.min(16)).min(RETRY_MAX);
    let jitter = rand::random_range(0.0..0.25);
    base.mul_f64(1.0 + jitter).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        for attempt in 0..40 {
            let d = delay(attempt);
            let base = RETRY_MIN.saturating_mul(1u32 << attempt.min(16)).min(RETRY_MAX);
            assert!(d >= base && d <= RETRY_MAX && d <= base.mul_f64(1.25), "{attempt}: {d:?}");
        }
        assert_eq!(delay(30), RETRY_MAX);
    }
}
