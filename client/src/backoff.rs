//! Exponential backoff with full jitter, as a pure value: time and randomness
//! are passed in, so tests drive it without waiting.

/// How reconnect delays grow.
///
/// Retry `n` (1-based) waits a uniformly random time in
/// `[min_ms, min(max_ms, min_ms · factorⁿ)]`: full jitter above a floor, so a
/// crowd of clients that lost the same server spreads out instead of
/// reconnecting in lockstep, and no client ever retries in a fast loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffConfig {
    /// The shortest delay, in milliseconds (default 500).
    pub min_ms: u64,
    /// The longest delay, in milliseconds (default 20 000).
    pub max_ms: u64,
    /// How much the ceiling grows per attempt (default 2).
    pub factor: f64,
    /// How long a connection must stay up before the attempt counter resets,
    /// in milliseconds (default 5 000). A server that accepts and immediately
    /// drops connections therefore still sees growing delays.
    pub min_uptime_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self { min_ms: 500, max_ms: 20_000, factor: 2.0, min_uptime_ms: 5_000 }
    }
}

impl BackoffConfig {
    /// The upper bound of the delay for retry number `attempt` (1-based).
    pub fn ceiling(&self, attempt: u32) -> u64 {
        let min = self.min_ms.min(self.max_ms);
        let exp = attempt.min(64) as i32;
        let ceiling = min as f64 * self.factor.max(1.0).powi(exp);
        if ceiling.is_finite() && ceiling < self.max_ms as f64 {
            (ceiling as u64).max(min)
        } else {
            self.max_ms
        }
    }

    /// The delay for retry number `attempt` given a random number `r` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, r: f64) -> u64 {
        let min = self.min_ms.min(self.max_ms);
        let ceiling = self.ceiling(attempt);
        let r = if r.is_finite() { r.clamp(0.0, 1.0) } else { 0.0 };
        min + ((ceiling - min) as f64 * r) as u64
    }
}

/// The attempt counter of one connection's reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
    opened_at: Option<u64>,
}

impl Backoff {
    /// A fresh counter.
    pub fn new(config: BackoffConfig) -> Self {
        Self { config, attempt: 0, opened_at: None }
    }

    /// The configuration.
    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    /// How many retries have been scheduled since the counter last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The connection opened at `now` (milliseconds).
    pub fn opened(&mut self, now: u64) {
        self.opened_at = Some(now);
    }

    /// The connection closed at `now`: the counter resets if it had stayed up
    /// for at least `min_uptime_ms`.
    pub fn closed(&mut self, now: u64) {
        if let Some(at) = self.opened_at.take() {
            if now.saturating_sub(at) >= self.config.min_uptime_ms {
                self.attempt = 0;
            }
        }
    }

    /// Starts over, as after an explicit reconnect by the app.
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.opened_at = None;
    }

    /// Counts one more retry and returns its number and delay, given a random
    /// number in `[0, 1)`.
    pub fn next_delay(&mut self, r: f64) -> (u32, u64) {
        self.attempt = self.attempt.saturating_add(1);
        (self.attempt, self.config.delay(self.attempt, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_bounds() {
        let cfg = BackoffConfig::default();
        for attempt in 1..40 {
            for r in [0.0, 0.25, 0.5, 0.999_999, 1.0] {
                let d = cfg.delay(attempt, r);
                assert!((500..=20_000).contains(&d), "attempt {attempt} r {r}: {d}");
                assert!(d <= cfg.ceiling(attempt));
            }
        }
        assert_eq!(cfg.ceiling(1), 1_000);
        assert_eq!(cfg.ceiling(2), 2_000);
        assert_eq!(cfg.ceiling(5), 16_000);
        assert_eq!(cfg.ceiling(6), 20_000);
        assert_eq!(cfg.ceiling(u32::MAX), 20_000);
    }

    #[test]
    fn jitter_covers_the_whole_range() {
        let cfg = BackoffConfig::default();
        assert_eq!(cfg.delay(3, 0.0), 500);
        assert_eq!(cfg.delay(3, 0.5), 500 + 3_500 / 2);
        assert_eq!(cfg.delay(3, 0.999_999_9), 3_999);
        // A spread of random inputs gives a spread of delays, all distinct.
        let delays: std::collections::BTreeSet<u64> = (0..100).map(|i| cfg.delay(10, i as f64 / 100.0)).collect();
        assert_eq!(delays.len(), 100);
        // Garbage from the random source cannot escape the bounds.
        assert_eq!(cfg.delay(3, f64::NAN), 500);
        assert_eq!(cfg.delay(3, 7.0), 4_000);
        assert_eq!(cfg.delay(3, -1.0), 500);
    }

    #[test]
    fn attempts_grow_until_reset_after_min_uptime() {
        let mut b = Backoff::new(BackoffConfig::default());
        assert_eq!(b.next_delay(1.0), (1, 1_000));
        assert_eq!(b.next_delay(1.0), (2, 2_000));
        // Up for less than the minimum uptime: the counter keeps growing.
        b.opened(10_000);
        b.closed(14_999);
        assert_eq!(b.next_delay(1.0), (3, 4_000));
        // Up long enough: it resets.
        b.opened(20_000);
        b.closed(25_000);
        assert_eq!(b.next_delay(1.0), (1, 1_000));
        // Closing without having opened changes nothing.
        b.closed(90_000);
        assert_eq!(b.next_delay(1.0), (2, 2_000));
        b.reset();
        assert_eq!(b.attempt(), 0);
    }

    #[test]
    fn odd_configs_are_tamed() {
        let cfg = BackoffConfig { min_ms: 5_000, max_ms: 1_000, factor: 0.5, min_uptime_ms: 0 };
        for attempt in 1..10 {
            assert_eq!(cfg.delay(attempt, 0.7), 1_000);
        }
        let cfg = BackoffConfig { min_ms: 0, max_ms: 100, factor: 2.0, min_uptime_ms: 0 };
        assert!(cfg.delay(3, 0.5) <= 100);
    }
}
