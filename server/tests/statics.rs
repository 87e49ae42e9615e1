//! `--static`: what is not served (dotfiles, symlinks out of the root), and
//! the HTTP a browser's cache relies on (HEAD, ETag, Last-Modified, 304s,
//! immutable hashed assets, nosniff, ranges).

mod common;

use std::{net::SocketAddr, path::PathBuf};

use common::*;

struct Site {
    root: PathBuf,
}

impl Site {
    fn new(name: &str) -> Self {
        let base = std::env::temp_dir().join(format!("crosswire-statics-{name}-{}", std::process::id()));
        let root = base.join("dist");
        let outside = base.join("outside");
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("index.html"), "<h1>demo</h1>").unwrap();
        std::fs::write(root.join("demo-0123456789abcdef_bg.wasm"), [0u8, 97, 115, 109]).unwrap();
        std::fs::write(root.join("notes.txt"), "0123456789").unwrap();
        std::fs::write(root.join(".env"), "SECRET=1").unwrap();
        std::fs::write(root.join(".git/config"), "[core]").unwrap();
        std::fs::write(outside.join("secret.txt"), "outside").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("leak.txt")).unwrap();
            std::os::unix::fs::symlink(root.join("notes.txt"), root.join("alias.txt")).unwrap();
            std::os::unix::fs::symlink(root.join(".env"), root.join("env.txt")).unwrap();
        }
        Self { root }
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        std::fs::remove_dir_all(self.root.parent().unwrap()).ok();
    }
}

async fn serve(site: &Site) -> crosswire_server::RunningServer {
    let mut config = config();
    config.static_dir = Some(site.root.clone());
    start_pubsub(config).await
}

async fn get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String, String) {
    http_raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Connection: close\r\n\r\n")).await
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(str::trim))
}

#[tokio::test]
async fn dotfiles_and_symlinks_out_of_the_root_are_not_served() {
    let site = Site::new("hidden");
    let server = serve(&site).await;
    let addr = server.local_addr();
    for path in ["/.env", "/.git/config", "/%2eenv", "/.git/"] {
        let (status, _, body) = get(addr, path, "").await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(!body.contains("SECRET") && !body.contains("[core]"));
    }
    #[cfg(unix)]
    {
        let (status, _, body) = get(addr, "/leak.txt", "").await;
        assert_eq!(status, 404, "a symlink out of the root: {body}");
        assert_eq!(get(addr, "/env.txt", "").await.0, 404, "a symlink to a dotfile");
        let (status, _, body) = get(addr, "/alias.txt", "").await;
        assert_eq!((status, body.as_str()), (200, "0123456789"), "a symlink inside the root");
    }
}

#[tokio::test]
async fn responses_carry_nosniff_validators_and_caching() {
    let site = Site::new("headers");
    let server = serve(&site).await;
    let addr = server.local_addr();
    let (status, head, body) = get(addr, "/", "").await;
    assert_eq!((status, body.as_str()), (200, "<h1>demo</h1>"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));
    assert_eq!(header(&head, "content-type"), Some("text/html; charset=utf-8"));
    assert!(header(&head, "etag").is_some() && header(&head, "last-modified").is_some(), "{head}");

    let (status, head, _) = get(addr, "/demo-0123456789abcdef_bg.wasm", "").await;
    assert_eq!(status, 200);
    assert_eq!(header(&head, "cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(header(&head, "content-type"), Some("application/wasm"));
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));

    let (status, head, _) = get(addr, "/missing.js", "").await;
    assert_eq!(status, 404);
    assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
}

#[tokio::test]
async fn conditional_requests_get_304() {
    let site = Site::new("conditional");
    let server = serve(&site).await;
    let addr = server.local_addr();
    let (_, head, _) = get(addr, "/notes.txt", "").await;
    let etag = header(&head, "etag").expect("an etag").to_owned();
    let modified = header(&head, "last-modified").expect("last-modified").to_owned();
    // Header values come back lowercased from the helper; tags compare as opaque text.
    let sent = etag.replacen("w/", "W/", 1);
    let (status, head, body) = get(addr, "/notes.txt", &format!("If-None-Match: {sent}\r\n")).await;
    assert_eq!((status, body.as_str()), (304, ""), "{head}");
    assert_eq!(header(&head, "etag"), Some(etag.as_str()));
    let (status, _, body) = get(addr, "/notes.txt", "If-None-Match: W/\"other\"\r\n").await;
    assert_eq!((status, body.as_str()), (200, "0123456789"));
    // last-modified was lowercased by the helper; HTTP dates parse case-insensitively
    // only in some parsers, so restore the canonical capitalisation.
    let date = modified
        .split(' ')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
        .replace("Gmt", "GMT");
    let (status, _, body) = get(addr, "/notes.txt", &format!("If-Modified-Since: {date}\r\n")).await;
    assert_eq!((status, body.as_str()), (304, ""), "If-Modified-Since {date}");
}

#[tokio::test]
async fn head_has_no_body_and_ranges_are_served() {
    let site = Site::new("head");
    let server = serve(&site).await;
    let addr = server.local_addr();
    let (status, head, body) =
        http_raw(addr, "HEAD /notes.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!((status, body.as_str()), (200, ""));
    assert_eq!(header(&head, "content-length"), Some("10"));
    let (status, head, body) = get(addr, "/notes.txt", "Range: bytes=2-4\r\n").await;
    assert_eq!((status, body.as_str()), (206, "234"), "{head}");
}
