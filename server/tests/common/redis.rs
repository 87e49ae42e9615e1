//! The services a Redis-backed test needs, each started by the test on a free
//! loopback port and stopped (its files deleted) when dropped: a private
//! `redis-server` ([`RedisServer`]) and crosswire nodes, real processes of
//! the `crosswire-server` binary pointed at it ([`Node`]).
//!
//! `redis-server` is Debian's (`scripts/setup.sh` installs it); a test that
//! needs it and cannot find it fails, saying so, rather than passing
//! without having run.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU64, AtomicUsize, Ordering},
    time::Duration,
};

use crosswire_server::ServerConfig;

use super::WAIT;

/// The `redis-server` to run: `$CROSSWIRE_REDIS_SERVER`, else the one on `PATH`.
fn redis_server_bin() -> String {
    std::env::var("CROSSWIRE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_owned())
}

/// A directory of its own under the system temp dir, unique across the
/// test binaries that run at once (pid) and the tests inside one (counter).
fn private_dir(what: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "crosswire-{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    // A leftover of a killed earlier run with the same pid would carry its data over.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creates a private directory");
    dir
}

/// A port that was free a moment ago. Another process may take it before
/// ours binds it; [`RedisServer::start`] retries with a new one when so.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binds a free port").local_addr().unwrap().port()
}

/// Sends one command in RESP on a new connection and returns the answer:
/// the line of a simple string, error, integer or null (`+PONG`, `-ERR …`,
/// `:2`, `$-1`), or the body of a bulk string; `None` when nothing answers. Blocking, with
/// timeouts: a loopback round trip, also usable from `Drop`. Counts the
/// connection in `connected` once made.
fn reply(port: u16, args: &[&str], connected: &AtomicUsize) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    // Counted once Redis has it: tries while it starts up reach nobody.
    connected.fetch_add(1, Ordering::Relaxed);
    stream.set_read_timeout(Some(WAIT)).ok()?;
    stream.set_write_timeout(Some(WAIT)).ok()?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer);
        let Some((head, body)) = text.split_once("\r\n") else { continue };
        // A bulk string's body, once whole; any other answer (the null bulk
        // string `$-1` too) is its first line.
        match head.strip_prefix('$').and_then(|len| len.parse::<usize>().ok()) {
            Some(len) => {
                if body.len() >= len {
                    return Some(body[..len].to_owned());
                }
            }
            None => return Some(head.to_owned()),
        }
    }
}

/// A private `redis-server` on 127.0.0.1, with its own data directory.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    persistent: bool,
    /// More `redis-server` arguments (`--maxmemory 16mb`, …), kept for restarts.
    extra: Vec<String>,
    child: Option<Child>,
    /// Connections this harness opened since the last (re)start, to tell
    /// them from a server's in Redis's own count.
    own_connections: AtomicUsize,
}

impl RedisServer {
    /// Without persistence (`--save "" --appendonly no`): a restart loses
    /// everything, as a cache-only Redis does.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(false, &[]).await
    }

    /// Without persistence, with more `redis-server` arguments
    /// (`["--maxmemory", "16mb", "--maxmemory-policy", "noeviction"]`).
    pub async fn start_configured(extra: &[&str]) -> RedisServer {
        RedisServer::start_with(false, extra).await
    }

    /// With an append-only file fsynced on every write
    /// (`--appendonly yes --appendfsync always`): a restart, even after
    /// SIGKILL, loses nothing that Redis acknowledged.
    pub async fn start_persistent() -> RedisServer {
        RedisServer::start_with(true, &[]).await
    }

    async fn start_with(persistent: bool, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: 0,
            dir: private_dir("redis"),
            persistent,
            extra: extra.iter().map(|arg| (*arg).to_owned()).collect(),
            child: None,
            own_connections: AtomicUsize::new(0),
        };
        let mut last_log = String::new();
        // Another process can take the port between free_port() and our bind.
        for _ in 0..5 {
            server.port = free_port();
            match server.launch().await {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start on a free port after 5 tries; its last log:\n{last_log}");
    }

    /// Starts the process on `self.port` in `self.dir` and waits until it
    /// answers PING; on failure returns its log (and leaves nothing running).
    async fn launch(&mut self) -> Result<(), String> {
        let log = self.dir.join("redis.log");
        let port = self.port.to_string();
        let dir = self.dir.to_str().expect("a UTF-8 temp path").to_owned();
        let mut args = vec![
            "--port",
            port.as_str(),
            "--bind",
            "127.0.0.1",
            "--dir",
            dir.as_str(),
            "--logfile",
            "redis.log",
            "--daemonize",
            "no",
            "--save",
            "",
        ];
        if self.persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            args.extend(["--appendonly", "no"]);
        }
        args.extend(self.extra.iter().map(String::as_str));
        let child = Command::new(redis_server_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}): run scripts/setup.sh", redis_server_bin()));
        self.child = Some(child);
        self.own_connections.store(0, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.reply(&["PING"]).as_deref() == Some("+PONG") {
                return Ok(());
            }
            let exited = self.child.as_mut().unwrap().try_wait().expect("polls redis-server").is_some();
            if exited || tokio::time::Instant::now() >= deadline {
                self.kill();
                return Err(std::fs::read_to_string(&log).unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// [`super::config`] pointed at this Redis.
    pub fn config(&self) -> ServerConfig {
        ServerConfig { redis: Some(self.url()), ..super::config() }
    }

    /// SIGKILL, and waits for the process to be gone: no shutdown save, no
    /// goodbye to its clients, the port free again.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (after [`Self::kill`]):
    /// with persistence it reloads its append-only file, without it comes
    /// back empty.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(log) = self.launch().await {
            panic!("redis-server did not restart on port {}; its log:\n{log}", self.port);
        }
    }

    /// One command on a connection of its own, counted as the harness's.
    fn reply(&self, args: &[&str]) -> Option<String> {
        reply(self.port, args, &self.own_connections)
    }

    /// Runs one command on it and returns the answer (see [`reply`]).
    pub fn command(&self, args: &[&str]) -> String {
        self.reply(args).unwrap_or_else(|| panic!("redis answers {args:?}"))
    }

    /// How many keys it holds (`DBSIZE`).
    pub fn dbsize(&self) -> u64 {
        let answer = self.command(&["DBSIZE"]);
        answer.strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("DBSIZE: {answer}"))
    }

    /// Closes every pub/sub connection (`CLIENT KILL TYPE pubsub`), which is
    /// how nodes receive other nodes' publications; returns how many it closed.
    pub fn kill_pubsub_clients(&self) -> u64 {
        let answer = self.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        answer.strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("CLIENT KILL: {answer}"))
    }

    /// How many pub/sub connections it has now (`CLIENT LIST TYPE pubsub`,
    /// one line per connection).
    pub fn pubsub_clients(&self) -> usize {
        self.command(&["CLIENT", "LIST", "TYPE", "pubsub"]).lines().filter(|l| !l.is_empty()).count()
    }

    /// Whether anything but this harness connected to it since it (re)started:
    /// a server configured with it that never did was not using it.
    pub fn used_by_others(&self) -> bool {
        let info = self.command(&["INFO", "stats"]);
        let total: usize = info
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_connections_received");
        // That INFO's own connection is counted on both sides.
        total > self.own_connections.load(Ordering::Relaxed)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A crosswire node: the `crosswire-server` binary, on a free port, with
/// `--redis` and test-friendly limits. Killed (SIGKILL) when dropped if it
/// still runs.
pub struct Node {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

/// The flags every test node gets: no rate limit in the way of a test's
/// bursts, presence of a dead node gone in 1.5 s.
pub const NODE_FLAGS: &[&str] = &[
    "--publish-rate",
    "1000000",
    "--publish-burst",
    "1000000",
    "--subscribe-rate",
    "1000000",
    "--subscribe-burst",
    "1000000",
    "--presence-ttl-ms",
    "1500",
];

impl Node {
    /// Starts a node on Redis `redis` (a URL) with [`NODE_FLAGS`] and `extra`
    /// flags, and waits (bounded) for the line with its address.
    pub async fn start(redis: &str, extra: &[&str]) -> Node {
        let dir = private_dir("node");
        let log = dir.join("node.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_crosswire-server"))
            .args(["--host", "127.0.0.1", "--port", "0", "--redis", redis])
            .args(NODE_FLAGS)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("creates the node's log"))
            .spawn()
            .expect("the binary starts");
        // A thread reads stdout to its end: the first line is the address;
        // the rest is drained so that a later print never meets a closed pipe.
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = tx.send(lines.next().and_then(Result::ok).unwrap_or_default());
            for _ in lines {}
        });
        let line = tokio::time::timeout(WAIT, rx).await.ok().and_then(Result::ok).unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("crosswire listening on http://") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the node did not start: {line:?}; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        };
        Node { addr: addr.parse().expect("an address"), child, log }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the node logged so far (stderr), for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: the node dies at once, closing no connection gracefully and
    /// cleaning nothing up in Redis. Returns when the process is gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the node's graceful shutdown begins; see [`Self::wait_exit`].
    pub fn sigterm(&self) {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -TERM {}", self.child.id());
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(tokio::time::Instant::now() < deadline, "the node did not exit; its log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The engine a shared test suite runs against: the embedded in-memory one,
/// or Redis (a private `redis-server` that lives as long as this value).
/// A Redis engine that no server ever connected to fails the test when
/// dropped: a server that ignored it ran the test on the memory engine.
pub enum Engine {
    Memory,
    Redis(RedisServer),
}

impl Engine {
    pub fn memory() -> Engine {
        Engine::Memory
    }

    pub async fn redis() -> Engine {
        Engine::Redis(RedisServer::start().await)
    }

    /// The same kind of engine, holding nothing yet: with Redis, another
    /// private redis-server.
    pub async fn fresh(&self) -> Engine {
        match self {
            Engine::Memory => Engine::Memory,
            Engine::Redis(_) => Engine::redis().await,
        }
    }

    /// [`super::config`], on this engine.
    pub fn config(&self) -> ServerConfig {
        match self {
            Engine::Memory => super::config(),
            Engine::Redis(redis) => redis.config(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Engine::Redis(redis) = self {
            if !std::thread::panicking() {
                assert!(redis.used_by_others(), "the server never connected to the Redis it was configured with");
            }
        }
    }
}

/// Turns test bodies `async fn name(engine: Engine)` into two tests each,
/// `memory::name` and `redis::name`. `name(flavor = "multi_thread", …)`
/// passes its arguments on to `#[tokio::test]`.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident $(($($arg:tt)*))?),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test$(($($arg)*))?]
                async fn $name() {
                    super::$name($crate::common::redis::Engine::memory()).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test$(($($arg)*))?]
                async fn $name() {
                    super::$name($crate::common::redis::Engine::redis().await).await
                }
            )*
        }
    };
}
