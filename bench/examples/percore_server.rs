//! The `crosswire-server` binary's protocol on one current-thread tokio
//! runtime per core instead of one multi-threaded runtime: each thread
//! accepts on its own `SO_REUSEPORT` socket (the kernel spreads connections
//! over them) and runs its peers' tasks itself, so no task moves between
//! threads; a publish still reaches subscribers on every thread. For
//! measuring the runtime choice (docs/BENCHMARKS.md), not for production: it
//! has no graceful shutdown (SIGTERM ends the process).
//!
//! ```text
//! cargo run --release -p crosswire-bench --example percore_server -- --port 0 --threads 2
//! ```

use std::{convert::Infallible, net::SocketAddr, sync::mpsc, thread};

use clap::Parser;
use crosswire_server::{text_response, Args, PubSub, RemoteAddr, Server, WebSocketService};
use http::StatusCode;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket};
use tower::ServiceExt;
use tracing_subscriber::EnvFilter;

/// crosswire-server, one current-thread runtime per core.
#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    args: Args,
    /// Runtimes (threads); default: the CPUs this process may run on.
    #[arg(long)]
    threads: Option<usize>,
}

/// A listener on `addr` that other threads may bind too.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// One runtime's accept loop: `/_ws` goes to the shared endpoint, on this thread.
async fn serve(listener: TcpListener, service: WebSocketService<PubSub>) {
    loop {
        let Ok((stream, remote)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let app = service_fn(move |mut req: Request<Incoming>| {
                let service = service.clone();
                async move {
                    if req.uri().path() == "/_ws" {
                        req.extensions_mut().insert(RemoteAddr(remote));
                        service.oneshot(req).await
                    } else {
                        Ok::<_, Infallible>(text_response(StatusCode::NOT_FOUND, "not found\n"))
                    }
                }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), app).with_upgrades().await;
        });
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let config = cli.args.into_config()?;
    let main_rt = runtime()?;
    // The endpoint (and its engine's tasks) lives on the first runtime; its
    // handles work from any thread.
    let (endpoint, first, addr) = main_rt.block_on(async {
        let endpoint = Server::new(config.clone(), PubSub::new(&config)).endpoint()?;
        let first = reuseport_listener(config.addr)?;
        let addr = first.local_addr()?;
        anyhow::Ok((endpoint, first, addr))
    })?;
    let (ready, bound) = mpsc::channel();
    for _ in 1..threads {
        let (service, ready) = (endpoint.service(), ready.clone());
        thread::spawn(move || {
            let rt = runtime().expect("a runtime");
            rt.block_on(async move {
                let listener = reuseport_listener(addr);
                let _ = ready.send(listener.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                if let Ok(listener) = listener {
                    serve(listener, service).await;
                }
            });
        });
    }
    for _ in 1..threads {
        bound.recv()?.map_err(anyhow::Error::msg)?;
    }
    println!("crosswire listening on http://{addr} ({threads} runtimes)");
    main_rt.block_on(serve(first, endpoint.service()));
    Ok(())
}
