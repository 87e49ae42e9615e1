//! Static files for `--static DIR`: the built demo app in production.

use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use http::{header, HeaderValue, StatusCode};
use http_body_util::Full;

use crate::{routes::text_response, HttpResponse};

/// Serves `path` from `dir`: `index.html` for directories, and for extension-less
/// paths that match no file (client-side routes of a single-page app).
pub(crate) async fn serve(dir: &Path, path: &str, head: bool) -> HttpResponse {
    let Some(relative) = sanitize(path) else {
        return text_response(StatusCode::BAD_REQUEST, "bad path\n");
    };
    let mut file = dir.join(&relative);
    if path.ends_with('/') || relative.as_os_str().is_empty() {
        file.push("index.html");
    }
    let body = match tokio::fs::read(&file).await {
        Ok(body) => body,
        Err(_) if file.extension().is_none() => match tokio::fs::read(dir.join("index.html")).await {
            Ok(body) => {
                file = dir.join("index.html");
                body
            }
            Err(_) => return text_response(StatusCode::NOT_FOUND, "not found\n"),
        },
        Err(_) => return text_response(StatusCode::NOT_FOUND, "not found\n"),
    };
    let len = body.len();
    let mut res = HttpResponse::new(Full::new(if head { Bytes::new() } else { Bytes::from(body) }));
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&file)));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    // trunk hashes asset names, so only the page itself must never be cached stale.
    let cache = if file.ends_with("index.html") { "no-cache" } else { "public, max-age=3600" };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    res
}

/// The path below the static root, or `None` if it tries to leave it.
fn sanitize(path: &str) -> Option<PathBuf> {
    let path = path.trim_start_matches('/');
    if path.contains('\\') || path.contains('\0') || path.contains('%') {
        return None;
    }
    let rel = PathBuf::from(path);
    rel.components().all(|c| matches!(c, Component::Normal(_))).then_some(rel)
}

fn content_type(file: &Path) -> &'static str {
    match file.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        // The right type lets browsers compile the module while it streams in.
        "wasm" => "application/wasm",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        assert_eq!(sanitize("/a/b.js"), Some(PathBuf::from("a/b.js")));
        assert_eq!(sanitize("/"), Some(PathBuf::new()));
        assert_eq!(sanitize("/../etc/passwd"), None);
        assert_eq!(sanitize("/a/../../x"), None);
        assert_eq!(sanitize("/%2e%2e/x"), None);
    }
}
