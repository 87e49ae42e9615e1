//! The server's Prometheus metrics (`/metrics`, [`crate::ServerHandle::metrics_text`]).
//!
//! Events are counted where they happen, in relaxed atomics only (what
//! prometheus-client's counters are), so a publish pays two uncontended
//! additions. Levels the server already tracks (open connections, topics,
//! queued and retained bytes) are read when scraped, not mirrored on every
//! change: the hot path pays nothing for them.

use prometheus_client::{
    encoding::prometheus_text,
    metrics::{
        counter::ConstCounter,
        counter::Counter,
        family::Family,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        info::Info,
    },
    registry::Registry,
};

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Why a WebSocket upgrade (or, at the standalone listener, a connection
/// before its request is read) was refused: the `reason` label of
/// `crosswire_upgrades_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// The request broke the RFC 6455 handshake rules.
    BadHandshake,
    /// The `Host` header failed the DNS-rebinding check.
    Host,
    /// The browser `Origin` is not allowed.
    Origin,
    /// The `upgrade` hook refused it (for `PubSub`: authentication).
    Auth,
    /// The client's address opens connections faster than `connect_rate_per_ip`.
    RateLimited,
    /// `max_connections` are open.
    TooManyConnections,
    /// The client's address holds `max_connections_per_ip` already.
    TooManyConnectionsPerIp,
    /// The server is shutting down.
    Draining,
}

impl Rejection {
    const ALL: [Self; 8] = [
        Self::BadHandshake,
        Self::Host,
        Self::Origin,
        Self::Auth,
        Self::RateLimited,
        Self::TooManyConnections,
        Self::TooManyConnectionsPerIp,
        Self::Draining,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::BadHandshake => "bad_handshake",
            Self::Host => "host",
            Self::Origin => "origin",
            Self::Auth => "auth",
            Self::RateLimited => "rate_limited",
            Self::TooManyConnections => "too_many_connections",
            Self::TooManyConnectionsPerIp => "too_many_connections_per_ip",
            Self::Draining => "draining",
        }
    }
}

type ReasonLabel = [(&'static str, &'static str); 1];

/// Levels read from the server's state at scrape time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Levels {
    pub(crate) connections: usize,
    pub(crate) topics: usize,
    pub(crate) queue_bytes: usize,
    pub(crate) history_bytes: usize,
    /// Messages queued for subscribers so far (one per subscriber reached).
    pub(crate) deliveries: u64,
}

/// One server's metrics. Owned by the server state; every counter is a
/// relaxed atomic.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// One counter per reason, cloned out of the family (clones share the
    /// atomic), so that counting a refusal takes no lock even under a flood.
    rejected: [Counter; Rejection::ALL.len()],
    publishes: Counter,
    slow_consumer_closes: Counter,
    write_timeout_closes: Counter,
    engine_round_trip: Histogram,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("crosswire");
        let rejected_family = Family::<ReasonLabel, Counter>::default();
        // Every reason from the start, at 0: a rate over a series that
        // appears only on its first event misses that event.
        let rejected = Rejection::ALL.map(|r| rejected_family.get_or_create(&[("reason", r.label())]).clone());
        registry.register(
            "upgrades_rejected",
            "WebSocket upgrades refused (at the standalone listener, connections refused before their request), by reason",
            rejected_family,
        );
        let publishes = Counter::default();
        registry.register("publishes", "Messages published to a topic", publishes.clone());
        let slow_consumer_closes = Counter::default();
        registry.register(
            "slow_consumer_closes",
            "Peers closed with 1013 because their outbound queue or the server's queue budget overflowed",
            slow_consumer_closes.clone(),
        );
        let write_timeout_closes = Counter::default();
        registry.register(
            "write_timeout_closes",
            "Peers dropped because their socket took no bytes for the write timeout",
            write_timeout_closes.clone(),
        );
        // 100 µs to about 6.5 s: a same-datacenter Redis round trip is well
        // under a millisecond, and one past seconds is an outage.
        let engine_round_trip = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register(
            "engine_round_trip_seconds",
            "Round trips to the pub/sub engine (Redis), in seconds",
            engine_round_trip.clone(),
        );
        registry.register(
            "build",
            "The running crosswire-server's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        Self { registry, rejected, publishes, slow_consumer_closes, write_timeout_closes, engine_round_trip }
    }

    pub(crate) fn rejected(&self, reason: Rejection) {
        self.rejected[reason as usize].inc();
    }

    /// One message published from this node.
    pub(crate) fn published(&self) {
        self.publishes.inc();
    }

    pub(crate) fn slow_consumer_closed(&self) {
        self.slow_consumer_closes.inc();
    }

    pub(crate) fn write_timed_out(&self) {
        self.write_timeout_closes.inc();
    }

    /// Records one round trip to the pub/sub engine.
    #[cfg(test)]
    pub(crate) fn observe_engine_round_trip(&self, d: std::time::Duration) {
        self.engine_round_trip.observe(d.as_secs_f64());
    }

    /// The round-trip histogram itself, for an engine that lives below the
    /// server state: clones share their buckets, and `observe` takes seconds.
    pub(crate) fn engine_round_trip(&self) -> Histogram {
        self.engine_round_trip.clone()
    }

    /// Every metric in the Prometheus text format (0.0.4), with `levels` as
    /// read at this scrape.
    pub(crate) fn encode(&self, levels: Levels) -> String {
        let mut scrape = Registry::with_prefix("crosswire");
        for (name, help, value) in [
            ("connections", "WebSocket connections open", levels.connections),
            ("topics", "Topics that exist (with subscribers, retained history, or a live epoch)", levels.topics),
            ("queue_bytes", "Live bytes queued for peers, server-wide", levels.queue_bytes),
            ("history_bytes", "Bytes of topic history retained, server-wide", levels.history_bytes),
        ] {
            scrape.register(name, help, ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)));
        }
        // Counted by the fan-out itself (one add per message, whatever the
        // subscriber count), read here.
        scrape.register(
            "deliveries",
            "Messages queued for this node's subscribers (one per subscriber reached)",
            ConstCounter::new(levels.deliveries),
        );
        let mut text = String::new();
        // Writing to a String cannot fail, and every metric here encodes.
        prometheus_text::encode(&mut text, &self.registry).expect("metrics encode");
        prometheus_text::encode(&mut text, &scrape).expect("metrics encode");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels() -> Levels {
        Levels { connections: 3, topics: 2, queue_bytes: 100, history_bytes: 50, deliveries: 0 }
    }

    #[test]
    fn every_family_is_exposed_with_its_reasons_at_zero() {
        let text = Metrics::new().encode(levels());
        for line in [
            "crosswire_connections 3",
            "crosswire_topics 2",
            "crosswire_queue_bytes 100",
            "crosswire_history_bytes 50",
            "crosswire_publishes_total 0",
            "crosswire_deliveries_total 0",
            "crosswire_slow_consumer_closes_total 0",
            "crosswire_write_timeout_closes_total 0",
            "crosswire_engine_round_trip_seconds_count 0",
            &format!("crosswire_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION")),
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
        for reason in Rejection::ALL {
            let line = format!("crosswire_upgrades_rejected_total{{reason=\"{}\"}} 0", reason.label());
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn counters_count_what_they_are_told() {
        let metrics = Metrics::new();
        metrics.published();
        metrics.published();
        metrics.rejected(Rejection::Origin);
        metrics.rejected(Rejection::Origin);
        metrics.slow_consumer_closed();
        metrics.write_timed_out();
        metrics.observe_engine_round_trip(std::time::Duration::from_millis(2));
        metrics.engine_round_trip().observe(0.5);
        let text = metrics.encode(Levels { deliveries: 3, ..levels() });
        for line in [
            "crosswire_publishes_total 2",
            "crosswire_deliveries_total 3",
            "crosswire_upgrades_rejected_total{reason=\"origin\"} 2",
            "crosswire_upgrades_rejected_total{reason=\"auth\"} 0",
            "crosswire_slow_consumer_closes_total 1",
            "crosswire_write_timeout_closes_total 1",
            "crosswire_engine_round_trip_seconds_count 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line:?} missing from\n{text}");
        }
    }
}
