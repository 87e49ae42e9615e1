//! The WebSocket opening handshake (RFC 6455 §4.2), validated by hand.
//!
//! Each rule the request can break has its own [`Rejection`] variant with its
//! own status, so a client (or its developer) learns exactly what was wrong.
//! A leaf: it builds its refusals with [`crate::response`] and knows nothing
//! of hooks or peers. Public only with the `fuzzing` feature.

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client's key before hashing.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade request: what the `101 Switching Protocols` answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The `Sec-WebSocket-Accept` value derived from the client's key.
    pub accept_key: String,
}

impl Accept {
    /// The `101 Switching Protocols` response completing the handshake.
    pub fn response(self) -> Response<Full<Bytes>> {
        let mut res = Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = res.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        // The key's own buffer becomes the header's (`from_str` would copy
        // it into a second allocation).
        let accept = Bytes::from(self.accept_key);
        h.insert(
            header::SEC_WEBSOCKET_ACCEPT,
            HeaderValue::from_maybe_shared(accept).expect("base64 is a valid header value"),
        );
        res
    }
}

/// Why an upgrade request was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The request method was not GET: 405 with `Allow: GET`.
    #[error("WebSocket upgrades must use GET, not {0}")]
    MethodNotGet(Method),
    /// Plain HTTP to the WebSocket path (no `Upgrade` header at all): 426 with `Upgrade: websocket`.
    #[error("this path speaks WebSocket only: send an Upgrade: websocket request")]
    UpgradeRequired,
    /// `Upgrade` named something other than `websocket`: 400.
    #[error("the Upgrade header must be \"websocket\"")]
    InvalidUpgradeHeader,
    /// `Connection` lacked the `upgrade` token: 400.
    #[error("the Connection header must contain the \"upgrade\" token")]
    InvalidConnectionHeader,
    /// `Sec-WebSocket-Key` missing: 400.
    #[error("the Sec-WebSocket-Key header is missing")]
    MissingKey,
    /// `Sec-WebSocket-Key` was not base64 of 16 bytes: 400.
    #[error("the Sec-WebSocket-Key header must be the base64 encoding of 16 bytes")]
    MalformedKey,
    /// `Sec-WebSocket-Version` was not 13: 426 with `Sec-WebSocket-Version: 13`.
    #[error("unsupported Sec-WebSocket-Version: this server speaks version 13")]
    UnsupportedVersion,
}

impl Rejection {
    /// The HTTP status this rejection answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MethodNotGet(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpgradeRequired | Self::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Self::InvalidUpgradeHeader | Self::InvalidConnectionHeader | Self::MissingKey | Self::MalformedKey => {
                StatusCode::BAD_REQUEST
            }
        }
    }

    /// The full HTTP response: the status, the headers the RFC asks for, and
    /// the reason as a plain-text body.
    pub fn response(&self) -> Response<Full<Bytes>> {
        let mut res = crate::response::text_response(self.status(), self.to_string());
        let h = res.headers_mut();
        match self {
            Self::MethodNotGet(_) => {
                h.insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            Self::UpgradeRequired => {
                h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            Self::UnsupportedVersion => {
                h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            _ => {}
        }
        res
    }
}

/// Checks that `req` is a valid WebSocket upgrade and derives its accept key.
/// (Reachable from outside the crate with the `fuzzing` feature only, hence
/// an example that is not run.)
///
/// ```ignore
/// use crosswire_server::handshake::{validate_upgrade, Rejection};
///
/// let req = http::Request::get("/_ws")
///     .header("upgrade", "websocket")
///     .header("connection", "keep-alive, Upgrade")
///     .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
///     .header("sec-websocket-version", "13")
///     .body(())?;
/// assert_eq!(validate_upgrade(&req)?.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
///
/// let plain = http::Request::get("/_ws").body(())?;
/// assert_eq!(validate_upgrade(&plain), Err(Rejection::UpgradeRequired));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
// The service validates the parts it has moved into the hook's request
// (validate_parts); this whole-request form is the fuzz target's.
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code))]
pub fn validate_upgrade<B>(req: &Request<B>) -> Result<Accept, Rejection> {
    validate_parts(req.method(), req.headers())
}

/// [`validate_upgrade`] on a request's method and headers: what the service
/// has once it has handed them to the `upgrade` hook.
pub(crate) fn validate_parts(method: &Method, headers: &HeaderMap) -> Result<Accept, Rejection> {
    if method != Method::GET {
        return Err(Rejection::MethodNotGet(method.clone()));
    }
    let Some(upgrade) = headers.get(header::UPGRADE) else {
        return Err(Rejection::UpgradeRequired);
    };
    if !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return Err(Rejection::InvalidUpgradeHeader);
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(Rejection::InvalidConnectionHeader);
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).ok_or(Rejection::MissingKey)?;
    // Decoded on the stack: only its length matters. 18 bytes is the most
    // the 24 characters of a 16-byte key could decode to; a key decoding to
    // more does not fit (an error), and is malformed anyway.
    match BASE64.decode_slice(key.as_bytes(), &mut [0u8; 18]) {
        Ok(16) => {}
        _ => return Err(Rejection::MalformedKey),
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(HeaderValue::as_bytes) != Some(b"13") {
        return Err(Rejection::UnsupportedVersion);
    }
    Ok(Accept { accept_key: accept_key(key.as_bytes()) })
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WS_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Whether a comma-separated header (possibly repeated) contains `token`,
/// case-insensitively: `Connection: keep-alive, Upgrade` is a valid upgrade.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    // Split as bytes, once `to_str` has vouched for them: a valid value is
    // visible ASCII, spaces and tabs, whose only whitespace `trim_ascii`
    // trims as `str::trim` would, without the UTF-8 decoding.
    headers
        .get_all(name)
        .iter()
        .filter(|v| v.to_str().is_ok())
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get("/_ws");
        for (k, v) in pairs {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    const GOOD: [(&str, &str); 4] = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("sec-websocket-version", "13"),
    ];

    fn with(name: &str, value: Option<&str>) -> Request<()> {
        let mut pairs: Vec<_> = GOOD.iter().copied().filter(|(k, _)| *k != name).collect();
        if let Some(v) = value {
            pairs.push((name, v));
        }
        req(&pairs)
    }

    #[test]
    fn rules() {
        assert!(validate_upgrade(&req(&GOOD)).is_ok());
        assert_eq!(
            validate_upgrade(&with("upgrade", Some("WebSocket"))).unwrap().accept_key,
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(validate_upgrade(&with("upgrade", None)), Err(Rejection::UpgradeRequired));
        assert_eq!(validate_upgrade(&with("upgrade", Some("h2c"))), Err(Rejection::InvalidUpgradeHeader));
        assert_eq!(validate_upgrade(&with("connection", Some("keep-alive"))), Err(Rejection::InvalidConnectionHeader));
        assert_eq!(validate_upgrade(&with("connection", None)), Err(Rejection::InvalidConnectionHeader));
        assert!(validate_upgrade(&with("connection", Some("keep-alive , UPGRADE"))).is_ok());
        assert_eq!(validate_upgrade(&with("sec-websocket-key", None)), Err(Rejection::MissingKey));
        assert_eq!(validate_upgrade(&with("sec-websocket-key", Some("c2hvcnQ="))), Err(Rejection::MalformedKey));
        assert_eq!(validate_upgrade(&with("sec-websocket-key", Some("not base64!!"))), Err(Rejection::MalformedKey));
        for (key, len) in
            [("AAAAAAAAAAAAAAAAAAAAAAA=", 17), ("AAAAAAAAAAAAAAAAAAAAAAAA", 18), ("AAAAAAAAAAAAAAAAAAAAAAAAAAA=", 20)]
        {
            assert_eq!(BASE64.decode(key).unwrap().len(), len);
            assert_eq!(validate_upgrade(&with("sec-websocket-key", Some(key))), Err(Rejection::MalformedKey), "{key}");
        }
        assert_eq!(
            validate_upgrade(&with("sec-websocket-key", Some("dGhlIHNhbXBsZSBub25jZQ"))),
            Err(Rejection::MalformedKey)
        );
        assert_eq!(validate_upgrade(&with("sec-websocket-version", Some("8"))), Err(Rejection::UnsupportedVersion));
        assert_eq!(validate_upgrade(&with("sec-websocket-version", None)), Err(Rejection::UnsupportedVersion));
        let post = Request::post("/_ws").body(()).unwrap();
        assert_eq!(validate_upgrade(&post).unwrap_err().status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
