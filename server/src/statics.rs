//! Static files for `--static DIR`: the built demo app in production.
//!
//! tower-http's `ServeFile` does the serving (streaming, `Range`, HEAD,
//! `Last-Modified` and `If-Modified-Since`); this module decides which file a
//! path names, refuses what must not be served (dotfiles, anything a symlink
//! takes outside the root), and adds what it lacks: `ETag` with
//! `If-None-Match`, caching rules for trunk's hashed names, and `nosniff`.

use std::{
    path::{Component, Path, PathBuf},
    time::UNIX_EPOCH,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use percent_encoding::percent_decode_str;
use tower::ServiceExt;
use tower_http::services::{fs::ServeFileSystemResponseBody, ServeFile};

use crate::response::text_response;

/// A response of the standalone server's routes: one of ours, or a file.
pub(crate) type RouteBody = Either<Full<Bytes>, ServeFileSystemResponseBody>;

/// Why a path is not served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum StaticRejection {
    /// `..`, a NUL, a backslash or bad percent-encoding.
    #[error("bad path")]
    BadPath,
    /// No such file, or one that is not served: dotfiles and files outside
    /// the root look the same as missing ones, so as not to reveal them.
    #[error("not found")]
    NotFound,
}

impl StaticRejection {
    fn response(self) -> Response<RouteBody> {
        let status = match self {
            Self::BadPath => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
        };
        text_response(status, format!("{self}\n")).map(Either::Left)
    }
}

/// Serves the file `req`'s path names below `root`: `index.html` for
/// directories, and for extension-less paths that match no file (client-side
/// routes of a single-page app).
pub(crate) async fn serve<B: Send + 'static>(root: &Path, req: Request<B>) -> Response<RouteBody> {
    let mut res = match resolve(root, req.uri().path()).await {
        Ok(file) => serve_file(file, req).await,
        Err(rejection) => rejection.response(),
    };
    // Browsers must not guess a script or a page out of a file served as text.
    res.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}

/// A file chosen for a request: the name it was asked by (which gives its type
/// and caching) and its real path, free of symlinks.
#[derive(Debug)]
struct Resolved {
    name: PathBuf,
    real: PathBuf,
    meta: std::fs::Metadata,
}

async fn resolve(root: &Path, path: &str) -> Result<Resolved, StaticRejection> {
    let relative = sanitize(path)?;
    let mut name = root.join(&relative);
    if path.ends_with('/') || relative.as_os_str().is_empty() {
        name.push("index.html");
    }
    let meta = match tokio::fs::metadata(&name).await {
        Ok(meta) if meta.is_dir() => {
            name.push("index.html");
            tokio::fs::metadata(&name).await.map_err(|_| StaticRejection::NotFound)?
        }
        Ok(meta) => meta,
        Err(_) if name.extension().is_none() => {
            name = root.join("index.html");
            tokio::fs::metadata(&name).await.map_err(|_| StaticRejection::NotFound)?
        }
        Err(_) => return Err(StaticRejection::NotFound),
    };
    if !meta.is_file() {
        return Err(StaticRejection::NotFound);
    }
    // Symlinks are followed only while they stay inside the root, and not to
    // a dotfile in it.
    let real_root = tokio::fs::canonicalize(root).await.map_err(|_| StaticRejection::NotFound)?;
    let real = tokio::fs::canonicalize(&name).await.map_err(|_| StaticRejection::NotFound)?;
    let inside = real.strip_prefix(&real_root).map_err(|_| StaticRejection::NotFound)?;
    if inside.components().any(|c| is_hidden(c.as_os_str())) {
        return Err(StaticRejection::NotFound);
    }
    Ok(Resolved { name, real, meta })
}

async fn serve_file<B: Send + 'static>(file: Resolved, mut req: Request<B>) -> Response<RouteBody> {
    let etag = etag(&file.meta);
    let cache = HeaderValue::from_static(cache_control(&file.name));
    if let Some(if_none_match) = req.headers().get(header::IF_NONE_MATCH) {
        if etag_matches(if_none_match, &etag) {
            let mut res = Response::new(Either::Left(Full::default()));
            *res.status_mut() = StatusCode::NOT_MODIFIED;
            res.headers_mut().insert(header::ETAG, etag);
            res.headers_mut().insert(header::CACHE_CONTROL, cache);
            return res;
        }
        // With If-None-Match present, If-Modified-Since is to be ignored (RFC 9110 §13.1.3).
        req.headers_mut().remove(header::IF_MODIFIED_SINCE);
    }
    let Ok(res) = ServeFile::new(&file.real).oneshot(req).await;
    let mut res = res.map(Either::Right);
    if res.status().is_success() || res.status() == StatusCode::NOT_MODIFIED {
        let h: &mut HeaderMap = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&file.name)));
        h.insert(header::ETAG, etag);
        h.insert(header::CACHE_CONTROL, cache);
    }
    res
}

/// A weak validator from size and modification time: it changes whenever the
/// file is rewritten, without reading the file.
fn etag(meta: &std::fs::Metadata) -> HeaderValue {
    let modified = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
    HeaderValue::try_from(format!("W/\"{:x}-{:x}.{:x}\"", meta.len(), modified.as_secs(), modified.subsec_nanos()))
        .expect("hex digits make a header value")
}

/// `*`, or a list of tags compared weakly (the `W/` prefix is ignored).
fn etag_matches(header: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(list) = header.to_str() else { return false };
    let ours = etag.to_str().unwrap_or_default().trim_start_matches("W/");
    list.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == ours)
}

/// trunk names assets `stem-<hash>.ext` (the wasm `…_bg.wasm`), the hash a
/// 64-bit seahash in unpadded hex: a new build gets new names, so those never
/// change and may be cached for a year. Everything else is revalidated on each
/// use (cheap with the `ETag`). Twelve digits at least: shorter hashes are
/// rare (one in 65 536), and `name-cafe.js` is more likely a plain name.
fn cache_control(file: &Path) -> &'static str {
    let stem = file.file_stem().and_then(|n| n.to_str()).unwrap_or("");
    let stem = stem.strip_suffix("_bg").unwrap_or(stem);
    let hashed = stem.rsplit_once('-').is_some_and(|(_, hash)| {
        (12..=16).contains(&hash.len()) && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if hashed {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    }
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().first() == Some(&b'.')
}

/// The path below the static root, percent-decoded; dotfiles (and `..`) are
/// refused here, before anything touches the disk.
fn sanitize(path: &str) -> Result<PathBuf, StaticRejection> {
    let decoded = percent_decode_str(path).decode_utf8().map_err(|_| StaticRejection::BadPath)?;
    if decoded.contains(['\\', '\0']) {
        return Err(StaticRejection::BadPath);
    }
    let mut relative = PathBuf::new();
    for part in decoded.split('/').filter(|p| !p.is_empty()) {
        if part == ".." {
            return Err(StaticRejection::BadPath);
        }
        if part.starts_with('.') {
            return Err(StaticRejection::NotFound);
        }
        relative.push(part);
    }
    // A part such as `C:` on Windows is a prefix, not a name.
    if !relative.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(StaticRejection::BadPath);
    }
    Ok(relative)
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
    fn paths_stay_inside_and_skip_dotfiles() {
        assert_eq!(sanitize("/a/b.js"), Ok(PathBuf::from("a/b.js")));
        assert_eq!(sanitize("/"), Ok(PathBuf::new()));
        assert_eq!(sanitize("/a%20b.txt"), Ok(PathBuf::from("a b.txt")));
        assert_eq!(sanitize("/../etc/passwd"), Err(StaticRejection::BadPath));
        assert_eq!(sanitize("/a/../../x"), Err(StaticRejection::BadPath));
        assert_eq!(sanitize("/%2e%2e/x"), Err(StaticRejection::BadPath));
        assert_eq!(sanitize("/.env"), Err(StaticRejection::NotFound));
        assert_eq!(sanitize("/.git/config"), Err(StaticRejection::NotFound));
        assert_eq!(sanitize("/%2egit/config"), Err(StaticRejection::NotFound));
        assert_eq!(sanitize("/a%5cb"), Err(StaticRejection::BadPath));
    }

    #[test]
    fn hashed_names_are_immutable() {
        let immutable = "public, max-age=31536000, immutable";
        assert_eq!(cache_control(Path::new("d/demo-0123456789abcdef_bg.wasm")), immutable);
        assert_eq!(cache_control(Path::new("d/demo-0123456789abcdef.js")), immutable);
        assert_eq!(cache_control(Path::new("d/index-0123456789abcdef.css")), immutable);
        assert_eq!(cache_control(Path::new("d/index.html")), "no-cache");
        assert_eq!(cache_control(Path::new("d/logo.png")), "no-cache");
        assert_eq!(cache_control(Path::new("d/my-file.js")), "no-cache");
        assert_eq!(cache_control(Path::new("d/vendor.min-123456789abcdef.js")), immutable, "15 digits, two dots");
        assert_eq!(cache_control(Path::new("d/app-cafe.js")), "no-cache");
    }

    #[test]
    fn etags_compare_weakly() {
        let ours = HeaderValue::from_static("W/\"10-5.0\"");
        assert!(etag_matches(&HeaderValue::from_static("W/\"10-5.0\""), &ours));
        assert!(etag_matches(&HeaderValue::from_static("\"x\", \"10-5.0\""), &ours));
        assert!(etag_matches(&HeaderValue::from_static("*"), &ours));
        assert!(!etag_matches(&HeaderValue::from_static("W/\"10-6.0\""), &ours));
    }
}
