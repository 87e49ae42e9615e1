//! URL helpers: the token query parameter and the HTTP probe address.

/// Appends `token` to a WebSocket URL as the `token` query parameter
/// (percent-encoded), before any `#fragment`. Browsers cannot set headers on
/// a WebSocket handshake, so this is how crosswire carries credentials.
pub fn with_token(url: &str, token: Option<&str>) -> String {
    let Some(token) = token else { return url.to_owned() };
    let (base, fragment) = match url.find('#') {
        Some(i) => url.split_at(i),
        None => (url, ""),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}token={}{fragment}", encode(token))
}

/// The `http(s)` URL to probe with `fetch` when a WebSocket handshake failed:
/// the same address with the scheme swapped (`ws`→`http`, `wss`→`https`).
/// `None` when the URL is not a WebSocket URL.
pub fn probe_url(ws_url: &str) -> Option<String> {
    let lower = ws_url.get(..6).unwrap_or("").to_ascii_lowercase();
    if lower.starts_with("wss://") {
        Some(format!("https://{}", &ws_url[6..]))
    } else if lower.starts_with("ws://") {
        Some(format!("http://{}", &ws_url[5..]))
    } else {
        None
    }
}

/// The WebSocket URL for `path` on the page's own origin, given the page's
/// `location.protocol` and `location.host`: `https:` pages get `wss:`.
pub fn same_origin_ws(protocol: &str, host: &str, path: &str) -> String {
    let scheme = if protocol.eq_ignore_ascii_case("https:") { "wss" } else { "ws" };
    let slash = if path.starts_with('/') { "" } else { "/" };
    format!("{scheme}://{host}{slash}{path}")
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_appended_and_encoded() {
        assert_eq!(with_token("ws://h/_ws", None), "ws://h/_ws");
        assert_eq!(with_token("ws://h/_ws", Some("abc")), "ws://h/_ws?token=abc");
        assert_eq!(with_token("ws://h/_ws?x=1", Some("a b&c=")), "ws://h/_ws?x=1&token=a%20b%26c%3D");
        assert_eq!(with_token("ws://h/_ws#f", Some("t")), "ws://h/_ws?token=t#f");
        assert_eq!(with_token("ws://h/_ws", Some("é")), "ws://h/_ws?token=%C3%A9");
    }

    #[test]
    fn probe_urls_swap_the_scheme() {
        assert_eq!(probe_url("ws://127.0.0.1:3000/_ws?token=t").as_deref(), Some("http://127.0.0.1:3000/_ws?token=t"));
        assert_eq!(probe_url("WSS://example.com/_ws").as_deref(), Some("https://example.com/_ws"));
        assert_eq!(probe_url("http://example.com/"), None);
        assert_eq!(probe_url("ws:"), None);
    }

    #[test]
    fn same_origin_urls() {
        assert_eq!(same_origin_ws("http:", "127.0.0.1:8080", "/_ws"), "ws://127.0.0.1:8080/_ws");
        assert_eq!(same_origin_ws("https:", "example.com", "_ws"), "wss://example.com/_ws");
    }
}
