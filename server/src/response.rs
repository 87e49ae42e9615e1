//! The HTTP responses the server answers with itself (refusals, `/healthz`):
//! a leaf, so that the handshake, origin, limit and static-file modules share
//! it without importing one another.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

/// The HTTP response type hooks answer a refused upgrade with.
pub type HttpResponse = Response<Full<Bytes>>;

/// A `text/plain` response with `status`: what a hook's refused upgrade
/// usually answers.
pub fn text_response(status: StatusCode, text: impl Into<String>) -> HttpResponse {
    let mut res = Response::new(Full::new(Bytes::from(text.into())));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    res
}
