//! The Origin check against cross-site WebSocket hijacking: a page on another
//! site must not open a WebSocket that rides on the user's cookies.

use http::{header, HeaderMap, Uri};

/// Which browser origins may connect.
#[derive(Debug, Clone, Default)]
pub(crate) struct OriginPolicy {
    allowed: Vec<String>,
    any: bool,
}

impl OriginPolicy {
    pub(crate) fn new(allowed: &[String]) -> Self {
        Self {
            any: allowed.iter().any(|o| o == "*"),
            allowed: allowed.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
        }
    }

    /// Allowed are: no `Origin` (not a browser), the server's own origin, a
    /// loopback origin (development with `trunk serve`), and the configured list.
    pub(crate) fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        let origin = origin.to_ascii_lowercase();
        if self.any || self.allowed.contains(&origin) {
            return true;
        }
        let Ok(uri) = origin.parse::<Uri>() else { return false };
        let Some(authority) = uri.authority() else { return false };
        let same_origin = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| host.eq_ignore_ascii_case(authority.as_str()));
        same_origin || matches!(authority.host(), "localhost" | "127.0.0.1" | "[::1]")
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

    #[test]
    fn defaults_and_list() {
        let p = OriginPolicy::new(&["https://app.example".into()]);
        assert!(p.allows(&headers(None, "ws.example")));
        assert!(p.allows(&headers(Some("https://ws.example"), "ws.example")));
        assert!(p.allows(&headers(Some("http://localhost:8080"), "ws.example")));
        assert!(p.allows(&headers(Some("http://127.0.0.1:8080"), "ws.example")));
        assert!(p.allows(&headers(Some("https://APP.example"), "ws.example")));
        assert!(!p.allows(&headers(Some("https://evil.example"), "ws.example")));
        assert!(!p.allows(&headers(Some("null"), "ws.example")));
        assert!(!p.allows(&headers(Some("http://localhost.evil.example"), "ws.example")));
        assert!(OriginPolicy::new(&["*".into()]).allows(&headers(Some("https://evil.example"), "x")));
    }
}
