//! Per-address connection limits (a rate of new connections, and optionally a
//! count of open ones), the client address behind trusted reverse proxies (read
//! from the one header the operator names), the
//! open-file limit, and the per-peer publish rate limit.

use std::{
    collections::{hash_map, HashMap, VecDeque},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use http::{header, HeaderMap, HeaderValue, StatusCode};
use ipnet::IpNet;
use tokio::time::Instant;

use crate::{
    config::{ProxyHeader, ServerConfig},
    response::{text_response, HttpResponse},
};

/// What per-address limits count under: an IPv4 address, or the /64 prefix of
/// an IPv6 one, since one subscriber is routinely handed a whole /64 and could
/// otherwise open connections from 2^64 "different" addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum IpKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => Self::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Why a client address may not open another connection; both answer 429.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum IpRejection {
    /// The address opens connections faster than `connect_rate_per_ip`.
    #[error("too many new connections from your address; retry later")]
    Rate {
        /// When the next connection would be accepted.
        retry_after: Duration,
    },
    /// The address has `max_connections_per_ip` open already.
    #[error("too many connections from your address; retry later")]
    Count,
}

impl IpRejection {
    pub(crate) fn status(&self) -> StatusCode {
        StatusCode::TOO_MANY_REQUESTS
    }

    /// Whole seconds, at least one, for `Retry-After`.
    pub(crate) fn retry_after_secs(&self) -> u64 {
        match self {
            Self::Rate { retry_after } => retry_after.as_secs() + 1,
            Self::Count => 1,
        }
    }

    /// The 429, for a refusal made after the request was read (behind a proxy).
    pub(crate) fn response(&self) -> HttpResponse {
        let mut res = text_response(self.status(), format!("{self}\n"));
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after_secs()));
        res
    }
}

/// Limits new and open connections per client address, and knows which peers
/// are trusted proxies that name the client in a header.
#[derive(Debug)]
pub(crate) struct IpLimiter {
    /// Open connections per address; 0: not counted.
    max: usize,
    /// Time between two connections at the sustained rate; `None`: no rate limit.
    interval: Option<Duration>,
    /// How far ahead of now an address's schedule may run: the burst.
    tolerance: Duration,
    proxies: Vec<IpNet>,
    /// The one header trusted proxies name the client in.
    header: ProxyHeader,
    entries: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<IpKey, Entry>,
    /// Every key of `map`, once, in the order a sweeping hand visits them:
    /// each admission looks at the next [`SWEEP_STEP`], forgetting those
    /// that no longer limit anything and putting the others back. A new key
    /// is one more per admission and the hand passes two, so the map stays
    /// within about twice the addresses that matter (open connections, or a
    /// schedule ahead of now), at O(1) per connection: no connection pays
    /// for a sweep of the whole map.
    hand: VecDeque<IpKey>,
}

/// One address's state: open connections and its GCRA schedule (the time its
/// next connection is due at the sustained rate; a burst runs it ahead of now).
#[derive(Debug)]
struct Entry {
    open: usize,
    due: Instant,
}

/// One connection's place under its address's limits; released on drop.
#[derive(Debug)]
pub(crate) struct IpSlot {
    limiter: Arc<IpLimiter>,
    key: IpKey,
    counted: bool,
}

/// Entries the sweeping hand looks at per admission: more than the one an
/// admission may add.
const SWEEP_STEP: usize = 2;

impl IpLimiter {
    pub(crate) fn new(config: &ServerConfig) -> Arc<Self> {
        let interval = (config.connect_rate_per_ip > 0).then(|| Duration::from_secs(1) / config.connect_rate_per_ip);
        Arc::new(Self {
            max: config.max_connections_per_ip,
            interval,
            tolerance: interval.unwrap_or_default() * config.connect_burst_per_ip.saturating_sub(1),
            proxies: config.trusted_proxies.clone(),
            header: config.trusted_proxy_header,
            entries: Mutex::new(Entries::default()),
        })
    }

    /// Admits one more connection from `ip`, or says why not.
    pub(crate) fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Result<IpSlot, IpRejection> {
        let key = IpKey::from(ip);
        if self.max == 0 && self.interval.is_none() {
            return Ok(IpSlot { limiter: Arc::clone(self), key, counted: false });
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("ip limiter lock");
        let Entries { map, hand } = &mut *entries;
        for _ in 0..SWEEP_STEP {
            let Some(seen) = hand.pop_front() else { break };
            match map.get(&seen) {
                Some(e) if e.open > 0 || e.due > now => hand.push_back(seen),
                _ => {
                    map.remove(&seen);
                }
            }
        }
        let entry = match map.entry(key) {
            hash_map::Entry::Occupied(entry) => entry.into_mut(),
            hash_map::Entry::Vacant(vacant) => {
                hand.push_back(key);
                vacant.insert(Entry { open: 0, due: now })
            }
        };
        if self.max > 0 && entry.open >= self.max {
            return Err(IpRejection::Count);
        }
        if let Some(interval) = self.interval {
            let due = entry.due.max(now);
            if due > now + self.tolerance {
                return Err(IpRejection::Rate { retry_after: due - (now + self.tolerance) });
            }
            entry.due = due + interval;
        }
        let counted = self.max > 0;
        if counted {
            entry.open += 1;
        }
        Ok(IpSlot { limiter: Arc::clone(self), key, counted })
    }

    /// Whether `peer` is a trusted reverse proxy.
    pub(crate) fn trusts(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.proxies.iter().any(|net| net.contains(&peer))
    }

    /// The client's address: `peer` itself unless it is a trusted proxy, else
    /// the nearest address in the configured header (`X-Forwarded-For` or
    /// `Forwarded`, never the other: a proxy passes that one on as the client
    /// wrote it) that is not itself a trusted proxy. Walking from the right
    /// matters: the left end of the list is whatever the client chose to send.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.trusts(peer) {
            return peer;
        }
        let values = headers.get_all(self.header.name()).into_iter().filter_map(|v| v.to_str().ok());
        let hops: Vec<Option<IpAddr>> = match self.header {
            ProxyHeader::XForwardedFor => values.flat_map(|v| v.split(',')).map(|hop| parse_hop(hop.trim())).collect(),
            ProxyHeader::Forwarded => values.flat_map(|v| v.split(',')).map(forwarded_for).collect(),
        };
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            // An unparsable hop (`unknown`, an obfuscated name) ends the walk:
            // the last address known is the best there is.
            let Some(hop) = hop else { break };
            client = hop;
            if !self.trusts(hop) {
                break;
            }
        }
        client
    }
}

/// The `for=` address of one `Forwarded` element (RFC 7239).
fn forwarded_for(element: &str) -> Option<IpAddr> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then(|| parse_hop(value.trim().trim_matches('"')))?
    })
}

/// `1.2.3.4`, `1.2.3.4:80`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    hop.rsplit_once(':')?.0.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if !self.counted {
            return;
        }
        // The entry stays for the sweeping hand to forget: a key is in the
        // map exactly while it is in the hand's queue.
        let mut entries = self.limiter.entries.lock().expect("ip limiter lock");
        if let Some(entry) = entries.map.get_mut(&self.key) {
            entry.open -= 1;
        }
    }
}

/// Raises the open-file soft limit to the hard limit, since every connection
/// is a descriptor and distributions default the soft limit to 1024; warns
/// when `max_connections` still does not fit.
pub(crate) fn raise_open_file_limit(max_connections: usize) {
    // Listener, static files, the runtime's own descriptors.
    const SPARE: u64 = 64;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < max_connections as u64 + SPARE => tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below --max-connections: connections beyond it fail to be accepted; \
             raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower --max-connections"
        ),
        Ok(limit) => tracing::debug!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self) -> bool {
        self.try_take_at(Instant::now())
    }

    /// [`Self::try_take`] at `now`, for a caller that has read the clock.
    pub(crate) fn try_take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.duration_since(self.last);
        self.last = now;
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next token.
    pub(crate) fn retry_after(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(((1.0 - self.tokens) / self.rate).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(max: usize, rate: u32, burst: u32, proxies: &[&str]) -> Arc<IpLimiter> {
        limiter_reading(ProxyHeader::XForwardedFor, max, rate, burst, proxies)
    }

    fn limiter_reading(header: ProxyHeader, max: usize, rate: u32, burst: u32, proxies: &[&str]) -> Arc<IpLimiter> {
        IpLimiter::new(&ServerConfig {
            max_connections_per_ip: max,
            connect_rate_per_ip: rate,
            connect_burst_per_ip: burst,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            trusted_proxy_header: header,
            ..ServerConfig::default()
        })
    }

    #[test]
    fn ip_slots_count_and_release() {
        let limiter = limiter(2, 0, 1, &[]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = limiter.try_acquire(ip).unwrap();
        let _b = limiter.try_acquire(ip).unwrap();
        assert_eq!(limiter.try_acquire(ip).err(), Some(IpRejection::Count));
        assert!(limiter.try_acquire("127.0.0.2".parse().unwrap()).is_ok());
        drop(a);
        assert!(limiter.try_acquire(ip).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let limiter = limiter(1, 0, 1, &[]);
        let _a = limiter.try_acquire("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(limiter.try_acquire("2001:db8:1:2:ffff::9".parse().unwrap()).is_err(), "same /64");
        assert!(limiter.try_acquire("2001:db8:1:3::1".parse().unwrap()).is_ok(), "next /64");
        let _v4 = limiter.try_acquire("10.0.0.1".parse().unwrap()).unwrap();
        assert!(limiter.try_acquire("::ffff:10.0.0.1".parse().unwrap()).is_err(), "mapped IPv4 is IPv4");
    }

    #[tokio::test(start_paused = true)]
    async fn connect_rate_allows_the_burst_then_the_rate() {
        let limiter = limiter(0, 10, 5, &[]);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..5).all(|_| limiter.try_acquire(ip).is_ok()));
        match limiter.try_acquire(ip) {
            Err(IpRejection::Rate { retry_after }) => assert!(retry_after <= Duration::from_millis(100)),
            other => panic!("{other:?}"),
        }
        assert!(limiter.try_acquire("192.0.2.2".parse().unwrap()).is_ok(), "other addresses unaffected");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(limiter.try_acquire(ip).is_ok());
        assert!(limiter.try_acquire(ip).is_err());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| limiter.try_acquire(ip).is_ok()).count(), 5, "never more than the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_addresses_are_forgotten() {
        let limiter = limiter(0, 1000, 1, &[]);
        for i in 0..4096 {
            let _ = limiter.try_acquire(IpAddr::V4(Ipv4Addr::from(i)));
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        let entries = limiter.entries.lock().unwrap();
        assert!(entries.map.len() <= 4, "{} entries for one address that matters", entries.map.len());
        assert_eq!(entries.hand.len(), entries.map.len());
    }

    /// Addresses holding connections are kept (their counts must stay
    /// true) while thousands of others come and go around them; the map
    /// stays within about twice the addresses that matter.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_keeps_what_counts_and_stays_near_it() {
        let limiter = limiter(1, 1000, 1, &[]);
        let held: Vec<IpSlot> = (0..100).map(|i| limiter.try_acquire(IpAddr::from([10, 0, 0, i])).unwrap()).collect();
        for i in 0..10_000u32 {
            drop(limiter.try_acquire(IpAddr::V4(Ipv4Addr::from(0xC000_0000 + i))).unwrap());
            tokio::time::advance(Duration::from_millis(1)).await;
            let len = limiter.entries.lock().unwrap().map.len();
            assert!(len <= 2 * 100 + 8, "{len} entries");
        }
        for i in 0..100 {
            let ip = IpAddr::from([10, 0, 0, i]);
            assert_eq!(limiter.try_acquire(ip).err(), Some(IpRejection::Count), "{ip}'s open connection still counts");
        }
        drop(held);
        assert!(limiter.try_acquire(IpAddr::from([10, 0, 0, 7])).is_ok());
    }

    #[test]
    fn client_address_behind_trusted_proxies() {
        let limiter = limiter(0, 0, 1, &["10.0.0.0/8"]);
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let outsider: IpAddr = "198.51.100.7".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.2.2.2".parse().unwrap());
        assert_eq!(limiter.client_ip(proxy, &h), "203.0.113.5".parse::<IpAddr>().unwrap());
        assert_eq!(limiter.client_ip(outsider, &h), outsider, "only trusted peers are believed");
        h.append("x-forwarded-for", "198.51.100.1".parse().unwrap());
        assert_eq!(
            limiter.client_ip(proxy, &h),
            "198.51.100.1".parse::<IpAddr>().unwrap(),
            "the last line is the nearest"
        );
        // The client's own Forwarded is passed through by a proxy that sets
        // X-Forwarded-For: it names nobody.
        h.insert(header::FORWARDED, r#"for=192.0.2.60;proto=http, for="[2001:db8::1]:4711""#.parse().unwrap());
        assert_eq!(limiter.client_ip(proxy, &h), "198.51.100.1".parse::<IpAddr>().unwrap(), "Forwarded ignored");
        h.remove("x-forwarded-for");
        assert_eq!(limiter.client_ip(proxy, &h), proxy, "only Forwarded: no client named");
        assert_eq!(limiter.client_ip(proxy, &HeaderMap::new()), proxy);
    }

    #[test]
    fn forwarded_when_configured_and_then_only_it() {
        let limiter = limiter_reading(ProxyHeader::Forwarded, 0, 0, 1, &["10.0.0.0/8"]);
        let proxy: IpAddr = "10.1.1.1".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            header::FORWARDED,
            r#"for=192.0.2.60;proto=http, for="[2001:db8::1]:4711", for=10.3.3.3"#.parse().unwrap(),
        );
        h.insert("x-forwarded-for", "203.0.113.5".parse().unwrap());
        assert_eq!(limiter.client_ip(proxy, &h), "2001:db8::1".parse::<IpAddr>().unwrap(), "X-Forwarded-For ignored");
        h.insert(header::FORWARDED, "for=unknown".parse().unwrap());
        assert_eq!(limiter.client_ip(proxy, &h), proxy);
        h.remove(header::FORWARDED);
        assert_eq!(limiter.client_ip(proxy, &h), proxy, "only X-Forwarded-For: no client named");
    }

    #[test]
    fn proxy_header_names_parse() {
        assert_eq!("X-Forwarded-For".parse::<ProxyHeader>(), Ok(ProxyHeader::XForwardedFor));
        assert_eq!("forwarded".parse::<ProxyHeader>(), Ok(ProxyHeader::Forwarded));
        assert!("x-real-ip".parse::<ProxyHeader>().is_err());
        assert_eq!(ProxyHeader::default().to_string(), "x-forwarded-for");
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_refills_at_its_rate() {
        let mut bucket = TokenBucket::new(10, 3);
        assert!((0..3).all(|_| bucket.try_take()));
        assert!(!bucket.try_take());
        assert!(bucket.retry_after() <= Duration::from_millis(100));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(bucket.try_take());
        assert!(!bucket.try_take());
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| bucket.try_take()).count(), 3, "never more than the burst");
    }
}
