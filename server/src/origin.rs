//! Which browsers may talk to the server: the Origin check against cross-site
//! WebSocket hijacking (a page on another site must not open a WebSocket that
//! rides on the user's cookies), and the Host check against DNS rebinding (a
//! page on an attacker's domain that resolves to 127.0.0.1 is same-origin with
//! itself, so only the `Host` it sends gives it away).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use http::{header, uri::Authority, HeaderMap, StatusCode, Uri};

use crate::response::{text_response, HttpResponse};

/// A parsed `scheme://host[:port]`, compared as a whole: `http://example.com`
/// is not `https://example.com`, nor `http://example.com:8080`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

impl Origin {
    /// `None` for anything but `scheme://host[:port]` (no path, no `null`).
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let uri = text.trim_end_matches('/').parse::<Uri>().ok()?;
        let scheme = uri.scheme_str()?.to_ascii_lowercase();
        let authority = uri.authority()?;
        if uri.path_and_query().is_some_and(|p| !matches!(p.as_str(), "" | "/")) || authority.as_str().contains('@') {
            return None;
        }
        let port = match authority.port_u16() {
            Some(port) => port,
            None => default_port(&scheme)?,
        };
        Some(Self { host: normalize_host(authority.host()), scheme, port })
    }

    fn is_loopback(&self) -> bool {
        is_loopback_host(&self.host)
    }

    /// Whether this is a web page's origin. A loopback origin of another
    /// scheme (`foo://127.0.0.1:1`, a browser extension's) is not a local
    /// development page, and nothing this server serves has one.
    fn is_web(&self) -> bool {
        matches!(self.scheme.as_str(), "http" | "https")
    }
}

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// Lowercase, without a trailing dot (`localhost.` is `localhost`).
fn normalize_host(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether `host`, as a request spells it, names `normalized` (a
/// [`normalize_host`] result): compared in place, since the Host check runs
/// for every request and a lowercased copy is an allocation.
fn host_is(host: &str, normalized: &str) -> bool {
    host.trim_end_matches('.').eq_ignore_ascii_case(normalized)
}

/// `localhost`, `*.localhost` (RFC 6761 reserves them for loopback), any
/// 127.x.x.x, and `[::1]`, in any case and with or without a trailing dot
/// (the Host check passes the request's own spelling).
fn is_loopback_host(host: &str) -> bool {
    const SUFFIX: &[u8] = b".localhost";
    let host = host.trim_end_matches('.');
    let bytes = host.as_bytes();
    if host.eq_ignore_ascii_case("localhost")
        || (bytes.len() >= SUFFIX.len() && bytes[bytes.len() - SUFFIX.len()..].eq_ignore_ascii_case(SUFFIX))
    {
        return true;
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    host.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// Why a request was refused by the browser-facing checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum OriginRejection {
    /// The `Origin` is neither the server's own, nor allowed, nor an allowed loopback one.
    #[error("this origin may not connect")]
    Origin,
    /// The `Host` is not one this server answers to (DNS rebinding).
    #[error("this server does not answer to that Host; a page reaching it under another name is refused (see --allowed-host)")]
    Host,
    /// The `Host` is not a valid `host[:port]`: bytes outside ASCII (a
    /// name that only looks like an allowed one), or more than one `Host`.
    #[error("the Host header must be one ASCII host[:port]")]
    BadHost,
}

impl OriginRejection {
    /// 403 for a foreign origin; 421 Misdirected Request for a foreign host;
    /// 400 for a malformed one (RFC 9112 §3.2).
    pub(crate) fn response(&self) -> HttpResponse {
        let status = match self {
            Self::Origin => StatusCode::FORBIDDEN,
            Self::Host => StatusCode::MISDIRECTED_REQUEST,
            Self::BadHost => StatusCode::BAD_REQUEST,
        };
        text_response(status, format!("{self}\n"))
    }
}

/// Which browser origins and which `Host` values are accepted.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginPolicy {
    allowed: Vec<Origin>,
    any_origin: bool,
    loopback_origins: bool,
    /// `None`: every `Host` is accepted.
    hosts: Option<HostPolicy>,
}

#[derive(Debug, Clone, Default)]
struct HostPolicy {
    loopback: bool,
    names: Vec<String>,
}

impl OriginPolicy {
    /// The policy of a server listening on `addr` (the configuration's
    /// `addr`, `allowed_origins`, `allow_loopback_origins` and `allowed_hosts`).
    pub(crate) fn new(
        addr: SocketAddr,
        allowed_origins: &[String],
        allow_loopback_origins: bool,
        allowed_hosts: &[String],
    ) -> Self {
        let listens_on_loopback = addr.ip().is_loopback();
        let any_host = allowed_hosts.iter().any(|h| h == "*");
        let hosts = (!any_host && (listens_on_loopback || !allowed_hosts.is_empty())).then(|| HostPolicy {
            loopback: listens_on_loopback,
            names: allowed_hosts.iter().map(|h| host_name(h)).collect(),
        });
        Self {
            any_origin: allowed_origins.iter().any(|o| o == "*"),
            allowed: allowed_origins.iter().filter_map(|o| Origin::parse(o)).collect(),
            loopback_origins: listens_on_loopback || allow_loopback_origins,
            hosts,
        }
    }

    /// The Host check, for every request: a malformed `Host` is refused
    /// whatever the policy, a foreign one when there is a policy.
    pub(crate) fn check_host(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), OriginRejection> {
        let mut values = headers.get_all(header::HOST).into_iter();
        let host = match (values.next(), values.next()) {
            // `to_str` fails on any byte outside visible ASCII: obs-text,
            // which httparse lets through, would otherwise make the header
            // unreadable here and the request pass as having no Host at all.
            (Some(value), None) => Some(value.to_str().map_err(|_| OriginRejection::BadHost)?),
            (Some(_), Some(_)) => return Err(OriginRejection::BadHost),
            (None, _) => uri.authority().map(Authority::as_str),
        };
        // HTTP/1.1 requires Host; a request without one does not come from a
        // browser, and a browser is what a rebinding attack drives.
        let Some(host) = host else { return Ok(()) };
        let Some(policy) = &self.hosts else {
            // Without a policy only the plain form is looked at closely
            // (`with_host` splits it in place); anything else must parse.
            return match with_host(host, |_| ()) {
                Some(()) => Ok(()),
                None => Err(OriginRejection::BadHost),
            };
        };
        let allowed = with_host(host, |name| {
            (policy.loopback && is_loopback_host(name)) || policy.names.iter().any(|n| host_is(name, n))
        });
        match allowed {
            Some(true) => Ok(()),
            Some(false) => Err(OriginRejection::Host),
            None => Err(OriginRejection::BadHost),
        }
    }

    /// Allowed are: no `Origin` (not a browser), the server's own origin (same
    /// host and port as `Host`), `http`/`https` loopback origins when the
    /// server listens on loopback or `allow_loopback_origins` says so, and the
    /// configured list.
    pub(crate) fn check_origin(&self, uri: &Uri, headers: &HeaderMap) -> Result<(), OriginRejection> {
        let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
        if self.any_origin {
            return Ok(());
        }
        let Some(origin) = origin.to_str().ok().and_then(Origin::parse) else { return Err(OriginRejection::Origin) };
        let same_origin = request_host(uri, headers).and_then(|h| h.parse::<Authority>().ok()).is_some_and(|host| {
            // The scheme the browser used is not visible here (TLS may end at a
            // proxy), so a `Host` without a port means the origin scheme's default.
            host_is(host.host(), &origin.host)
                && host.port_u16().or_else(|| default_port(&origin.scheme)) == Some(origin.port)
        });
        // The server's own pages and loopback development pages are web
        // pages; the configured list is taken as written.
        let own_or_loopback = origin.is_web() && (same_origin || (self.loopback_origins && origin.is_loopback()));
        if own_or_loopback || self.allowed.contains(&origin) {
            Ok(())
        } else {
            Err(OriginRejection::Origin)
        }
    }
}

fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    headers.get(header::HOST).and_then(|h| h.to_str().ok()).or_else(|| uri.authority().map(Authority::as_str))
}

/// `f` of the host part of `text` as [`Authority::host`] gives it, or `None`
/// when `text` does not parse as an [`Authority`]. A plain `name[:port]`
/// (letters, digits, dots and hyphens: what clients send) is split in place,
/// since it always parses; parsing an `Authority` copies the text into an
/// allocation of its own, for every request.
fn with_host<R>(text: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
    let bytes = text.as_bytes();
    let mut colon = None;
    let mut plain = !bytes.is_empty();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b':' if colon.is_none() => colon = Some(i),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' => {}
            _ => {
                plain = false;
                break;
            }
        }
    }
    if plain {
        return Some(f(&text[..colon.unwrap_or(text.len())]));
    }
    let authority = text.parse::<Authority>().ok()?;
    Some(f(authority.host()))
}

/// A configured allowed host, without a port if it was given one.
fn host_name(text: &str) -> String {
    match text.parse::<Authority>() {
        Ok(a) => normalize_host(a.host()),
        Err(_) => normalize_host(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    fn policy(addr: &str, origins: &[&str], hosts: &[&str]) -> OriginPolicy {
        let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        OriginPolicy::new(addr.parse().unwrap(), &strings(origins), false, &strings(hosts))
    }

    fn origin_ok(p: &OriginPolicy, origin: &str, host: &str) -> bool {
        p.check_origin(&Uri::from_static("/_ws"), &headers(Some(origin), host)).is_ok()
    }

    fn host_ok(p: &OriginPolicy, host: &str) -> bool {
        p.check_host(&Uri::from_static("/_ws"), &headers(None, host)).is_ok()
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        let p = policy("0.0.0.0:443", &["https://app.example"], &[]);
        assert!(p.check_origin(&Uri::from_static("/"), &headers(None, "ws.example")).is_ok());
        assert!(origin_ok(&p, "https://ws.example", "ws.example"));
        assert!(origin_ok(&p, "https://ws.example:8443", "ws.example:8443"));
        assert!(!origin_ok(&p, "https://ws.example:8443", "ws.example"));
        assert!(origin_ok(&p, "https://APP.example", "ws.example"));
        assert!(origin_ok(&p, "https://app.example:443", "ws.example"));
        assert!(!origin_ok(&p, "http://app.example", "ws.example"), "scheme");
        assert!(!origin_ok(&p, "https://app.example:8443", "ws.example"), "port");
        assert!(!origin_ok(&p, "https://evil.example", "ws.example"));
        assert!(!origin_ok(&p, "null", "ws.example"));
        // Not listening on loopback: loopback origins are someone's local page.
        assert!(!origin_ok(&p, "http://localhost:8080", "ws.example"));
        assert!(!origin_ok(&p, "http://127.0.0.1:8080", "ws.example"));
        assert!(origin_ok(&policy("0.0.0.0:443", &["*"], &[]), "https://evil.example", "x"));
    }

    #[test]
    fn loopback_origins_when_listening_on_loopback_or_told() {
        let p = policy("127.0.0.1:3000", &[], &[]);
        assert!(origin_ok(&p, "http://localhost:8080", "127.0.0.1:3000"));
        assert!(origin_ok(&p, "http://127.0.0.1:8080", "127.0.0.1:3000"));
        assert!(origin_ok(&p, "http://[::1]:8080", "127.0.0.1:3000"));
        assert!(!origin_ok(&p, "http://localhost.evil.example", "127.0.0.1:3000"));
        let told = OriginPolicy::new("0.0.0.0:3000".parse().unwrap(), &[], true, &[]);
        assert!(origin_ok(&told, "http://localhost:8080", "ws.example"));
    }

    #[test]
    fn loopback_origins_must_be_web_pages() {
        let told = OriginPolicy::new("0.0.0.0:3000".parse().unwrap(), &[], true, &[]);
        for p in [policy("127.0.0.1:3000", &[], &[]), told] {
            for ok in ["http://localhost:8080", "https://127.0.0.1", "HTTPS://[::1]:8443", "http://app.localhost"] {
                assert!(origin_ok(&p, ok, "127.0.0.1:3000"), "{ok}");
            }
            for bad in [
                "foo://127.0.0.1:1",
                "ws://localhost:8080",
                "chrome-extension://127.0.0.1",
                "chrome-extension://127.0.0.1:1",
                "file://",
                "file:///etc/passwd",
                "file://localhost/x",
            ] {
                assert!(!origin_ok(&p, bad, "127.0.0.1:3000"), "{bad}");
            }
        }
        // The server's own origin is a web page's too: the same host and port
        // under another scheme is not it.
        let p = policy("0.0.0.0:3000", &[], &[]);
        assert!(origin_ok(&p, "http://ws.example:3000", "ws.example:3000"));
        assert!(!origin_ok(&p, "foo://ws.example:3000", "ws.example:3000"));
        // A listed origin is taken as written.
        assert!(origin_ok(&policy("0.0.0.0:3000", &["app://local:1"], &[]), "app://local:1", "ws.example"));
    }

    fn host_bytes(p: &OriginPolicy, host: &[u8]) -> Result<(), OriginRejection> {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, http::HeaderValue::from_bytes(host).unwrap());
        p.check_host(&Uri::from_static("/_ws"), &h)
    }

    #[test]
    fn a_host_outside_ascii_is_malformed_whatever_the_policy() {
        let policies = [
            policy("127.0.0.1:3000", &[], &[]),
            policy("0.0.0.0:3000", &[], &[]),
            policy("127.0.0.1:3000", &[], &["*"]),
        ];
        for p in &policies {
            for bad in
                [&b"127.0.0.1\xff:3000"[..], "\u{2113}ocalhost".as_bytes(), "localhost\u{3002}".as_bytes(), b"a b"]
            {
                assert_eq!(host_bytes(p, bad), Err(OriginRejection::BadHost), "{:?}", String::from_utf8_lossy(bad));
            }
            assert_eq!(host_bytes(p, b"localhost:3000"), Ok(()));
            let mut two = HeaderMap::new();
            two.append(header::HOST, "localhost".parse().unwrap());
            two.append(header::HOST, "evil.example".parse().unwrap());
            assert_eq!(p.check_host(&Uri::from_static("/_ws"), &two), Err(OriginRejection::BadHost));
        }
        assert_eq!(OriginRejection::BadHost.response().status(), StatusCode::BAD_REQUEST);
        // No Host at all: not a browser, as before.
        assert_eq!(policies[0].check_host(&Uri::from_static("/_ws"), &HeaderMap::new()), Ok(()));
    }

    #[test]
    fn plain_hosts_split_as_authorities_do() {
        for text in [
            "ws.example",
            "ws.example:3000",
            "WS.Example.:80",
            "127.0.0.1:3000",
            ":80",
            "a:",
            "a:b",
            "a:b:c",
            "-.-",
            "",
            "[::1]:3000",
            "[::1",
            "user@host:1",
            "host@",
            "a b",
            "a%20b",
            "a_b~c",
            "h\u{e9}te",
            "a/b",
        ] {
            let parsed = text.parse::<Authority>().ok().map(|a| a.host().to_owned());
            assert_eq!(with_host(text, str::to_owned), parsed, "{text:?}");
        }
    }

    #[test]
    fn hosts_on_loopback() {
        let p = policy("127.0.0.1:3000", &[], &[]);
        for ok in [
            "127.0.0.1:3000",
            "localhost",
            "LOCALHOST:1",
            "localhost.:1",
            "app.localhost:80",
            "App.LocalHost.",
            "127.1.2.3",
            "[::1]:3000",
            "[0:0:0:0:0:0:0:1]",
        ] {
            assert!(host_ok(&p, ok), "{ok}");
        }
        for bad in ["evil.example:3000", "localhost.evil.example", "10.0.0.1", "[::2]:3000", "127.0.0.1.evil.example"] {
            assert!(!host_ok(&p, bad), "{bad}");
        }
        let extra = policy("127.0.0.1:3000", &[], &["dev.example:3000"]);
        assert!(host_ok(&extra, "dev.example"));
        assert!(host_ok(&extra, "DEV.example.:3000"));
        assert!(host_ok(&extra, "localhost"));
        assert!(host_ok(&policy("127.0.0.1:3000", &[], &["*"]), "evil.example"));
        assert!(host_ok(&policy("0.0.0.0:3000", &[], &[]), "evil.example"), "no check off loopback");
        let listed = policy("0.0.0.0:3000", &[], &["ws.example"]);
        assert!(host_ok(&listed, "ws.example:3000"));
        assert!(!host_ok(&listed, "evil.example"));
    }
}
