//! Capped, jittered exponential backoff for retrying transient failures (a broker, a shard or
//! PostgreSQL briefly away). Jitter keeps many retrying workers from waking in step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A retry schedule: `initial`, doubling up to `max`, each delay drawn from [50%, 100%] of the
/// nominal value.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// A schedule from `initial` to at most `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(1);
        Backoff { initial, max, attempt: 0, seed: u64::from(seed) | 1 }
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1_u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        let nominal = self.initial.saturating_mul(factor).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift: cheap jitter, no dependency, no shared state.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = 0.5 + (self.seed % 1_000) as f64 / 2_000.0;
        nominal.mul_f64(fraction)
    }

    /// Forget past failures (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jittered_and_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[3] >= Duration::from_millis(400) && delays[3] <= Duration::from_millis(800));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1), "capped delays stay near the cap");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
