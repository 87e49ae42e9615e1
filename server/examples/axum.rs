//! crosswire mounted in an axum app: the app's own route (`/api/hello`), a
//! directory of static files (the demo's `dist/`, with `--static`),
//! crosswire's protocol v1 endpoint at `/_ws`, and the operations endpoints
//! the standalone server has (`/healthz`, `/readyz`, `/metrics`), all on one
//! port. SIGTERM is a rolling restart (peers get 1012), Ctrl-C a stop (1001).
//!
//! `cargo run -p crosswire-server --example axum -- --port 3000 --static dist`
//!
//! The app owns the listener, so crosswire's per-connection limits apply per
//! WebSocket here (see `WebSocketService`), and the client address reaches
//! crosswire through a [`RemoteAddr`] request extension set by a middleware.

use std::net::SocketAddr;

use axum::{
    extract::{ConnectInfo, Request},
    http::{header, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{any_service, get},
    Router,
};
use clap::Parser;
use crosswire_server::{stop_signal, Args, PubSub, RemoteAddr, Server, ServerHandle};
use tower_http::services::ServeDir;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

/// Tells crosswire who the client is, from what axum's listener saw.
async fn remote_addr(ConnectInfo(addr): ConnectInfo<SocketAddr>, mut req: Request, next: Next) -> Response {
    req.extensions_mut().insert(RemoteAddr(addr));
    next.run(req).await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let config = crosswire_server::parse_cli::<Cli>()?.args.into_config()?;
    let endpoint = Server::new(config.clone(), PubSub::new(&config)).endpoint()?;

    let (ready, metrics) = (endpoint.handle(), endpoint.handle());
    let mut app = Router::new()
        .route("/api/hello", get(|| async { "hello from the app\n" }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || async move { readiness(&ready) }))
        .route(
            "/metrics",
            get(move || async move {
                ([(header::CONTENT_TYPE, ServerHandle::METRICS_CONTENT_TYPE)], metrics.metrics_text())
            }),
        )
        .route(&config.path, any_service(endpoint.service()));
    if let Some(dir) = &config.static_dir {
        app = app.fallback_service(ServeDir::new(dir));
    }
    let app = app.layer(middleware::from_fn(remote_addr));

    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    // Before the address goes out: whoever reads it may signal at once.
    let signal = stop_signal();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    println!("axum app listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            let _ = stop_tx.send(signal.await);
        })
        .await?;
    // The app's listener is closed; now the WebSockets get their 1012 (SIGTERM) or 1001.
    endpoint.stop(stop_rx.await.unwrap_or_default()).await;
    Ok(())
}

/// What the standalone server's `/readyz` answers.
fn readiness(handle: &ServerHandle) -> impl IntoResponse {
    match handle.is_ready() {
        true => (StatusCode::OK, "ready\n"),
        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
    }
}
