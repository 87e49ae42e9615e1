//! The Redis engine: any number of nodes share their topics through one
//! Redis (≥ 6).
//!
//! - **Publish** is one Lua script: it takes the topic's next seq, builds
//!   the `message` frame around it (the node sends the text before and after
//!   the seq), appends it to the topic's history (a list trimmed by count,
//!   age and bytes) and PUBLISHes it, all in one atomic step. Each node
//!   receives the frame text once and fans it out to its own subscribers:
//!   one copy per node crosses the network, and nobody encodes it again.
//! - **Delivery** goes over a fixed set of [`SHARD_CHANNELS`] channels, a
//!   topic always on the same one; every node subscribes to all of them at
//!   start. So a subscribe never waits for a Redis SUBSCRIBE round trip, and
//!   no (un)subscribe can race with a delivery. The cost: every node
//!   receives every publication and drops those of topics it has no
//!   subscriber for (a hash lookup). Right for a few nodes sharing most
//!   topics; see docs/SCALING.md.
//! - **Order and gaps.** One channel delivers in PUBLISH order, that is in
//!   seq order per topic. The node checks each seq against the last it
//!   delivered; a hole (its pub/sub connection dropped meanwhile) is filled
//!   from the history before going on, and when the history no longer
//!   reaches, the topic is reset for its subscribers (`recovered: false`).
//!   After a reconnect, every topic the node serves is caught up that way.
//! - **Epochs** live in Redis with the seq (`cw:{topic}:m`). They change
//!   only when the topic's state is gone: expired while idle and unheld, or
//!   a Redis restarted without persistence.
//! - **Presence** is a hash per topic of every node's peers, each entry with
//!   an expiry its node renews; a node that dies stops renewing, and its
//!   peers drop out of every list within `presence_ttl`. Joins and leaves
//!   travel on the shard channels.
//! - **Raw messages** (a hook's `peer.publish`, no seq, no history) travel
//!   on the shard channels too. They and the presence changes leave the node
//!   through one queue, in the order they happened, so the other nodes see
//!   one publisher's raw messages in its order; the channel keeps it. Being
//!   unsequenced, a raw message that cannot reach Redis is not recovered.
//! - **A topic nobody holds retains nothing.** A subscriber's first read
//!   gives a topic its state in Redis (epoch, seq); a publish to a topic
//!   without one (nobody anywhere was ever told an epoch of it) reaches
//!   nobody, writes no key, and is acked with seq 0. It still notifies the
//!   nodes (`u`): one that holds the topic then knows Redis lost the topic's
//!   state (an eviction) and resets its subscribers, never a silent gap.
//! - **Bulk reads** (history answers, subscribe replays, catch-ups) go over
//!   connections of their own ([`BULK_CONNECTIONS`]), never the one that
//!   carries publishes and presence, a page of at most [`BULK_PAGE_BYTES`]
//!   per round trip; at most [`BULK_READS`] reads run at once per node, the
//!   others wait (up to [`BULK_WAIT`], then `engine_unavailable`); a
//!   catch-up, which live delivery waits for, takes no turn and reads one
//!   page at a time. So no amount of history traffic makes another topic's
//!   publish time out.
//! - **Topic cap.** A node holds at most `--max-topics` topics at once (the
//!   topics its subscribers hold); a subscribe to one more is refused with
//!   `topic_limit`.
//! - **Redis unreachable, or refusing writes** (`maxmemory` reached under
//!   `noeviction`): every operation fails within [`COMMAND_TIMEOUT`] with
//!   [`EngineError::Unavailable`] carrying Redis's reason (publishers get
//!   `engine_unavailable`), subscribers stay connected, and the node
//!   reconnects with backoff when the connection itself was lost. A refused
//!   script writes nothing: Redis refuses its first write, before any other.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use crosswire_shared::{PresenceEntry, RawValue, Since, Topic};
use futures_util::StreamExt;
use prometheus_client::metrics::histogram::Histogram;
use redis::{aio::ConnectionManager, AsyncCommands, Client, Script};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    AckTo, Delivered, Delivery, Engine, EngineError, History, MessageText, Node, Pending, Publication, ReadLimit,
};
use crate::{config::ServerConfig, message::Message};

/// Channels carrying the topics between nodes.
pub(crate) const SHARD_CHANNELS: usize = 16;

/// How long one Redis operation may take before it counts as failed.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections of their own for bulk reads (history, replays, catch-ups).
pub(crate) const BULK_CONNECTIONS: usize = 2;

/// Bulk reads one node runs at once ([`Engine::read`]s: each may hold up to
/// its `ReadLimit` in memory until answered); more wait for a turn.
pub(crate) const BULK_READS: usize = 4;

/// How long a bulk read waits for its turn before it fails.
pub(crate) const BULK_WAIT: Duration = Duration::from_secs(10);

/// How long one page of a bulk read may take before it counts as failed.
pub(crate) const BULK_TIMEOUT: Duration = Duration::from_secs(10);

/// The most history bytes one round trip carries (always at least one
/// message): neither Redis nor the node builds a larger reply, whatever
/// the caller's [`ReadLimit`].
pub(crate) const BULK_PAGE_BYTES: usize = 1 << 20;

/// The most messages one page of a catch-up carries.
const CATCH_UP_PAGE_MESSAGES: usize = 1024;

/// Renewals (presence entries, held topics' meta hashes) one round trip carries.
const RENEW_BATCH: usize = 512;

/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// An ack whose message never came back is dropped after this long (the
/// client's own ack deadline has long fired).
const ACK_FORGET: Duration = Duration::from_secs(60);

/// What waits to go to the other nodes (raw messages, presence changes) while
/// Redis is slow or away. Past it, a raw message reaches only this node's
/// subscribers (it has no seq, so nothing could recover it anyway), and a
/// presence change reaches the others with the next renewal or expiry.
const OUTGOING_CAPACITY: usize = 4096;

/// The most queued items one round trip carries.
const OUTGOING_BATCH: usize = 256;

/// Seq, history append and notification, atomically.
/// KEYS: meta, history. ARGV: now (ms), ttl (ms), max messages, max
/// bytes, channel, frame head, frame tail, topic, node, publish id, from.
/// Returns the seq, or 0 when nobody holds the topic.
///
/// Only a subscriber's READ gives a topic its meta hash: without one, nobody
/// anywhere was told an epoch of the topic, so nothing is retained and no
/// key written; the nodes hear `u` (see `on_message`). Under `maxmemory`
/// with `noeviction`, Redis refuses the script's first write (HINCRBY)
/// before anything is written: a refused publish leaves no trace.
const PUBLISH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  redis.call('PUBLISH', ARGV[5], 'u\n' .. ARGV[8])
  return 0
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local entry = ARGV[1] .. '\n' .. ARGV[9] .. '\n' .. ARGV[10] .. '\n' .. ARGV[11] .. '\n' .. ARGV[6] .. seq .. ARGV[7]
if tonumber(ARGV[3]) > 0 then
  -- A list that expired or was evicted took its bytes with it.
  if redis.call('EXISTS', KEYS[2]) == 0 then
    redis.call('HSET', KEYS[1], 'bytes', 0)
  end
  redis.call('RPUSH', KEYS[2], entry)
  local bytes = redis.call('HINCRBY', KEYS[1], 'bytes', #entry)
  local len = redis.call('LLEN', KEYS[2])
  while len > 0 do
    local head = redis.call('LINDEX', KEYS[2], 0)
    local at = tonumber(string.match(head, '^(%d+)'))
    if len > tonumber(ARGV[3]) or bytes > tonumber(ARGV[4]) or at < now - ttl then
      redis.call('LPOP', KEYS[2])
      bytes = redis.call('HINCRBY', KEYS[1], 'bytes', -#head)
      len = len - 1
    else
      break
    end
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[5], 'm\n' .. ARGV[8] .. '\n' .. epoch .. '\n' .. seq .. '\n' .. entry)
return seq
"#;

/// A topic's position and the history after `since` (or the latest).
/// KEYS: meta, history. ARGV: since epoch ('' for none), since seq, limit,
/// create ('1'/'0'), epoch if new, now (ms), ttl (ms), max bytes.
/// Returns {epoch, top seq, complete (0/1), seq of the first entry, entries}.
const READ: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  if ARGV[4] ~= '1' then
    return {'', 0, ARGV[1] == '' and 1 or 0, 0, {}}
  end
  epoch = ARGV[5]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'bytes', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[7]))
local top = tonumber(redis.call('HGET', KEYS[1], 'seq'))
local now = tonumber(ARGV[6])
local ttl = tonumber(ARGV[7])
local len = redis.call('LLEN', KEYS[2])
while len > 0 do
  local head = redis.call('LINDEX', KEYS[2], 0)
  local at = tonumber(string.match(head, '^(%d+)'))
  if at < now - ttl then
    redis.call('LPOP', KEYS[2])
    redis.call('HINCRBY', KEYS[1], 'bytes', -#head)
    len = len - 1
  else
    break
  end
end
local first = top - len + 1
local limit = tonumber(ARGV[3])
local max_bytes = tonumber(ARGV[8])
-- Entries from index `from`, at most `limit` and `max_bytes` of them (always
-- one, so a reader paging through moves on), read a few at a time: a large
-- history never crosses to the client, or sits in a reply, whole.
local function window(from, to)
  local out, bytes = {}, 0
  while from <= to do
    local chunk = redis.call('LRANGE', KEYS[2], from, math.min(from + 31, to))
    for _, entry in ipairs(chunk) do
      if #out > 0 and bytes + #entry > max_bytes then
        return out
      end
      bytes = bytes + #entry
      out[#out + 1] = entry
    end
    from = from + 32
  end
  return out
end
if ARGV[1] == '' then
  local from = math.max(0, len - limit)
  return {epoch, top, 1, first + from, window(from, len - 1)}
end
local since = tonumber(ARGV[2])
if ARGV[1] ~= epoch or since > top or since < first - 1 then
  return {epoch, top, 0, 0, {}}
end
local from = since + 1 - first
local to = math.min(from + limit - 1, len - 1)
return {epoch, top, 1, since + 1, window(from, to)}
"#;

/// A node's peers in a topic: HSET with expiry, or HDEL; then PUBLISH the
/// event. KEYS: presence. ARGV: peer, value ('' to remove), channel, event.
const PRESENCE: &str = r#"
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], 86400000)
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"#;

/// A new epoch for a topic whose seq went back (Redis lost acknowledged
/// writes: a crash with `appendfsync everysec`), unless another node gave it
/// one already. Its history goes with the old epoch. KEYS: meta, history.
/// ARGV: the epoch seen, a new epoch. Returns the epoch now.
const NEW_EPOCH: &str = r#"
if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2], 'bytes', 0)
  redis.call('DEL', KEYS[2])
end
return redis.call('HGET', KEYS[1], 'epoch')
"#;

/// Topics shared over Redis.
pub struct RedisEngine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine").field("node", &self.shared.node_id).finish_non_exhaustive()
    }
}

struct Shared {
    client: Client,
    /// This node's id in Redis: what tells its own publications and
    /// presence entries from the others'.
    node_id: String,
    history_size: usize,
    history_ttl: Duration,
    history_bytes: usize,
    presence_ttl: Duration,
    /// Topics this node's subscribers may hold at once.
    max_topics: usize,
    connection: watch::Sender<Option<Connections>>,
    /// Turns of the bulk reads ([`BULK_READS`]).
    bulk_reads: Semaphore,
    /// The bulk connection the next page goes over.
    next_bulk: AtomicUsize,
    /// The pub/sub connection is subscribed: deliveries flow.
    subscribed: AtomicBool,
    node: OnceLock<Node>,
    publish: Script,
    read: Script,
    presence: Script,
    new_epoch: Script,
    next_publish: AtomicU64,
    /// Acks of this node's publishes, until their message comes back.
    acks: Mutex<HashMap<u64, (AckTo, tokio::time::Instant)>>,
    /// Topics held by this node's subscribers, with how many hold each.
    held: Mutex<HashMap<Topic, usize>>,
    /// This node's presence entries, renewed before they expire.
    present: Mutex<HashMap<(Topic, String), Option<String>>>,
    /// Where round trips are timed (`/metrics`), when the server has metrics.
    round_trips: OnceLock<Histogram>,
    /// Raw messages and presence changes, in the order they happened: one
    /// task sends them, so two raw messages of a publisher (or a join and
    /// the leave after it) reach the other nodes in that order.
    outgoing: mpsc::Sender<Outgoing>,
    /// The queue's other end, until the engine starts.
    outgoing_rx: Mutex<Option<mpsc::Receiver<Outgoing>>>,
}

/// This node's connections to Redis, made once; each reconnects by itself.
#[derive(Clone)]
struct Connections {
    /// Publishes, presence, and everything else that is small: what a
    /// client waits for, never behind a bulk reply.
    command: ConnectionManager,
    /// Bulk reads, a page at a time.
    bulk: Vec<ConnectionManager>,
}

/// What this node tells the other nodes without waiting for an answer.
enum Outgoing {
    /// A raw (unsequenced) message, as it goes on the shard channel.
    Raw { channel: String, payload: Vec<u8> },
    /// A presence change: the hash entry to write (empty: remove) and the event.
    Presence { topic: Topic, peer: String, value: String, event: String },
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn fresh_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn meta_key(topic: &Topic) -> String {
    format!("cw:{{{topic}}}:m")
}

fn history_key(topic: &Topic) -> String {
    format!("cw:{{{topic}}}:h")
}

fn presence_key(topic: &Topic) -> String {
    format!("cw:{{{topic}}}:p")
}

fn channel(topic: &Topic) -> String {
    // FNV-1a: the same shard on every node, whatever its hasher's seed.
    let hash =
        topic.as_str().bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("crosswire:{}", hash % SHARD_CHANNELS as u64)
}

fn unavailable(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unavailable(e.to_string())
}

/// One retained (or delivered) message as the scripts write it:
/// `at \n node \n publish id \n from \n frame`.
struct Entry<'a> {
    node: &'a str,
    publish_id: u64,
    from: &'a str,
    frame: Bytes,
}

/// The first `N` newline-ended fields of what the scripts and nodes write
/// (UTF-8 text), and the rest as it came: a frame, or a raw binary message.
fn fields<const N: usize>(payload: &Bytes) -> Option<([&str; N], Bytes)> {
    let mut fields = [""; N];
    let mut at = 0;
    for field in &mut fields {
        let len = payload[at..].iter().position(|b| *b == b'\n')?;
        *field = std::str::from_utf8(&payload[at..at + len]).ok()?;
        at += len + 1;
    }
    Some((fields, payload.slice(at..)))
}

/// What the READ script answers.
struct Entries {
    epoch: Arc<str>,
    /// The topic's last seq.
    seq: u64,
    /// Whether everything after the `since` asked for is retained.
    complete: bool,
    /// The seq of the first entry.
    first: u64,
    /// The entries as the PUBLISH script wrote them.
    entries: Vec<Bytes>,
}

fn parse_entry(bytes: &Bytes) -> Option<Entry<'_>> {
    let ([_at, node, publish_id, from], frame) = fields(bytes)?;
    Some(Entry { node, publish_id: publish_id.parse().ok()?, from, frame })
}

impl RedisEngine {
    /// An engine for the Redis at `url`, bounded as `config` says; it
    /// connects when the server starts.
    pub fn new(url: &str, config: &ServerConfig) -> Result<Self, EngineError> {
        let client = Client::open(url).map_err(unavailable)?;
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_CAPACITY);
        Ok(Self {
            shared: Arc::new(Shared {
                client,
                node_id: format!("{:012x}", rand::random::<u64>() >> 16),
                history_size: config.history_size,
                history_ttl: config.history_ttl,
                history_bytes: config.history_memory_bytes,
                presence_ttl: config.presence_ttl,
                max_topics: config.max_topics,
                connection: watch::channel(None).0,
                bulk_reads: Semaphore::new(BULK_READS),
                next_bulk: AtomicUsize::new(0),
                subscribed: AtomicBool::new(false),
                node: OnceLock::new(),
                publish: Script::new(PUBLISH),
                read: Script::new(READ),
                presence: Script::new(PRESENCE),
                new_epoch: Script::new(NEW_EPOCH),
                next_publish: AtomicU64::new(1),
                acks: Mutex::new(HashMap::new()),
                held: Mutex::new(HashMap::new()),
                present: Mutex::new(HashMap::new()),
                round_trips: OnceLock::new(),
                outgoing,
                outgoing_rx: Mutex::new(Some(outgoing_rx)),
            }),
        })
    }
}

impl RedisEngine {
    /// Times every round trip to Redis into `histogram` (seconds).
    pub(crate) fn timed(self, histogram: Histogram) -> Self {
        let _ = self.shared.round_trips.set(histogram);
        self
    }
}

impl Shared {
    /// The connections, waiting (bounded) for the first ones.
    async fn connections(&self) -> Result<Connections, EngineError> {
        // Once made, it is there for good: every command but the first few
        // takes it without a receiver of its own.
        if let Some(conn) = self.connection.borrow().clone() {
            return Ok(conn);
        }
        let mut rx = self.connection.subscribe();
        let wait = async move { rx.wait_for(Option::is_some).await.ok().and_then(|conn| conn.clone()) };
        match tokio::time::timeout(COMMAND_TIMEOUT, wait).await {
            Ok(Some(conn)) => Ok(conn),
            _ => Err(EngineError::Unavailable("not connected to Redis".into())),
        }
    }

    /// One operation on the command connection, timed into `/metrics`.
    async fn run<T>(&self, f: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>) -> Result<T, EngineError> {
        let conn = self.connections().await?.command;
        let started = tokio::time::Instant::now();
        let result = match tokio::time::timeout(COMMAND_TIMEOUT, f(conn)).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(EngineError::Unavailable("Redis did not answer in time".into())),
        };
        if let Some(histogram) = self.round_trips.get() {
            histogram.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    /// One page of a bulk read, on the next bulk connection, within
    /// [`BULK_TIMEOUT`]. Not timed into `/metrics`: the round trips there are
    /// what publishes wait for.
    async fn run_bulk<T>(
        &self,
        f: impl AsyncFnOnce(ConnectionManager) -> redis::RedisResult<T>,
    ) -> Result<T, EngineError> {
        let bulk = self.connections().await?.bulk;
        let conn = bulk[self.next_bulk.fetch_add(1, Ordering::Relaxed) % bulk.len()].clone();
        match tokio::time::timeout(BULK_TIMEOUT, f(conn)).await {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(EngineError::Unavailable("Redis did not answer a history read in time".into())),
        }
    }

    async fn publish(
        &self,
        topic: &Topic,
        from: &str,
        data: &RawValue,
        ack: Option<AckTo>,
    ) -> Result<u64, EngineError> {
        // The frame around the seq the script will assign, encoded here once.
        let sample = MessageText::encode(topic, 0, from, data);
        let text = sample.as_str();
        let marker = r#","seq":0,"#;
        let at = text.find(marker).expect("a message frame carries its seq") + marker.len() - 2;
        let (head, tail) = (&text[..at], &text[at + 1..]);
        let id = self.next_publish.fetch_add(1, Ordering::Relaxed);
        if let Some(ack) = ack {
            lock(&self.acks).insert(id, (ack, tokio::time::Instant::now()));
        }
        let result = self
            .run(async |mut conn| {
                self.publish
                    .key(meta_key(topic))
                    .key(history_key(topic))
                    .arg(now_ms())
                    .arg(self.history_ttl.as_millis() as u64)
                    .arg(self.history_size)
                    .arg(self.history_bytes)
                    .arg(channel(topic))
                    .arg(head)
                    .arg(tail)
                    .arg(topic.as_str())
                    .arg(&self.node_id)
                    .arg(id)
                    .arg(from)
                    .invoke_async::<u64>(&mut conn)
                    .await
            })
            .await;
        // An ack in order (its publisher is subscribed here) is queued by the
        // delivery of the message on this node, from the stream or from a
        // catch-up, in seq order with the topic's other messages. Any other
        // is queued by whoever has it first, the delivery or this answer,
        // under the lock of the pending acks: so the acks of one publisher go
        // out in the order of its publishes. Seq 0 (nobody holds the topic)
        // is delivered nowhere: this answer is its only way back. When the
        // publish failed (or we cannot know), the error frame answers
        // instead and no ack follows.
        let mut acks = lock(&self.acks);
        match &result {
            Ok(seq) => {
                if *seq == 0 || acks.get(&id).is_some_and(|(ack, _)| !ack.in_order) {
                    if let Some((ack, _)) = acks.remove(&id) {
                        ack.send(*seq);
                    }
                }
            }
            Err(_) => {
                acks.remove(&id);
            }
        }
        drop(acks);
        result
    }

    /// The READ script's answer, on a bulk connection: one page, at most
    /// [`BULK_PAGE_BYTES`] (or one message) whatever `limit` says.
    async fn read_entries(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Result<Entries, EngineError> {
        let (epoch, seq, complete, first, entries): (String, u64, u8, u64, Vec<Bytes>) = self
            .run_bulk(async |mut conn| {
                self.read
                    .key(meta_key(topic))
                    .key(history_key(topic))
                    .arg(since.map_or("", |s| &*s.epoch))
                    .arg(since.map_or(0, |s| s.seq))
                    .arg(limit.messages.max(1))
                    .arg(if create { "1" } else { "0" })
                    .arg(fresh_epoch())
                    .arg(now_ms())
                    .arg(self.history_ttl.as_millis() as u64)
                    .arg(limit.bytes.min(BULK_PAGE_BYTES))
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let entries = if limit.messages == 0 { Vec::new() } else { entries };
        Ok(Entries { epoch: epoch.into(), seq, complete: complete == 1, first, entries })
    }

    /// [`Engine::read`]: page after page of the READ script, as many as
    /// `limit` takes, in one of the [`BULK_READS`] turns.
    async fn read(
        &self,
        topic: &Topic,
        since: Option<&Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Result<History, EngineError> {
        // What a read holds until it is answered is bounded by its limit;
        // the turns bound how many hold it at once.
        let Ok(Ok(_turn)) = tokio::time::timeout(BULK_WAIT, self.bulk_reads.acquire()).await else {
            return Err(EngineError::Unavailable("too many history reads under way on this node".into()));
        };
        let mut page = self.read_entries(topic, since, limit, create).await?;
        // The first page fixes the position: every later page reads on from
        // the last seq read, up to this seq and no further (what follows it
        // is delivered, as after any read).
        let mut history =
            History { epoch: page.epoch.clone(), seq: page.seq, complete: page.complete, messages: Vec::new() };
        let mut bytes = 0usize;
        loop {
            let mut full = false;
            for (i, entry) in page.entries.iter().enumerate() {
                let seq = page.first + i as u64;
                let parsed = parse_entry(entry).ok_or_else(|| unavailable("a malformed history entry"))?;
                let frame = MessageText::from_utf8(&parsed.frame).map_err(unavailable)?;
                let over = !history.messages.is_empty() && bytes.saturating_add(frame.len()) > limit.bytes;
                if seq > history.seq || history.messages.len() >= limit.messages || over {
                    full = true;
                    break;
                }
                bytes += frame.len();
                history.messages.push((seq, frame));
            }
            let Some(&(last, _)) = history.messages.last() else { return Ok(history) };
            // (One message may be larger than the whole bound: it is read alone.)
            let done = full || page.entries.is_empty() || last >= history.seq || bytes >= limit.bytes;
            if done || history.messages.len() >= limit.messages {
                return Ok(history);
            }
            let rest = ReadLimit { messages: limit.messages - history.messages.len(), bytes: limit.bytes - bytes };
            let on = Since { epoch: history.epoch.to_string(), seq: last };
            page = self.read_entries(topic, Some(&on), rest, false).await?;
            if !page.complete || page.epoch != history.epoch {
                // The history was trimmed past what was read (or lost) while
                // it was read: a `since` can no longer be answered whole. The
                // latest messages (no `since`) are answered as far as read:
                // `History::next` says more was retained.
                if since.is_some() {
                    history.complete = false;
                    history.messages.clear();
                }
                return Ok(history);
            }
        }
    }

    /// The delivery of one entry (as the scripts write it), with the ack it
    /// owes when this node published it and has not acked it yet.
    fn delivery<'e>(&self, epoch: Arc<str>, seq: u64, entry: &'e Bytes) -> Option<Delivery<'e>> {
        let entry = parse_entry(entry)?;
        let frame = MessageText::from_utf8(&entry.frame).ok()?;
        let mut ack = None;
        if entry.node == self.node_id {
            let mut acks = lock(&self.acks);
            match acks.remove(&entry.publish_id) {
                // Out of order is fine for this one: sent now, under the lock
                // the answer path takes too (see `publish`).
                Some((taken, _)) if !taken.in_order => taken.send(seq),
                taken => ack = taken.map(|(taken, _)| taken),
            }
        }
        Some(Delivery { epoch, seq, from: entry.from, frame, ack })
    }

    /// Fills what this node missed of `topic` after `after` (in `epoch`),
    /// a page at a time, each delivered before the next is read, up to the
    /// topic's seq when it began (what follows comes in the stream). When
    /// that history is gone (a new epoch: Redis lost the topic), the
    /// subscribers are reset to the new epoch: at its start when all of it
    /// is retained, so they miss nothing of it, else at its last seq.
    async fn catch_up(&self, node: &Node, topic: &Topic, epoch: &Arc<str>, after: u64) {
        let page = ReadLimit { messages: CATCH_UP_PAGE_MESSAGES, bytes: BULK_PAGE_BYTES };
        let (mut epoch, mut after) = (epoch.clone(), after);
        let mut until = None;
        loop {
            let since = Since { epoch: epoch.to_string(), seq: after };
            let mut read = match self.read_entries(topic, Some(&since), page, true).await {
                Ok(read) => read,
                Err(e) => {
                    tracing::warn!(%topic, error = %e, "cannot catch up a topic from Redis; its subscribers get what follows");
                    return;
                }
            };
            if *read.epoch == *epoch && read.seq < after {
                // Redis is behind what this node delivered in the same epoch:
                // it lost writes, and would hand the same seqs out again. Past
                // that point the epoch means nothing: a new one, and a reset.
                tracing::warn!(%topic, "Redis lost acknowledged messages: the topic gets a new epoch");
                let renewed: Result<String, _> = self
                    .run(async |mut conn| {
                        self.new_epoch
                            .key(meta_key(topic))
                            .key(history_key(topic))
                            .arg(&*epoch)
                            .arg(fresh_epoch())
                            .invoke_async(&mut conn)
                            .await
                    })
                    .await;
                if let Ok(renewed) = renewed {
                    node.reset(topic, renewed.into(), read.seq);
                }
                return;
            }
            if !read.complete || read.epoch != epoch {
                tracing::info!(%topic, "history lost in Redis: resetting the topic's subscribers (recovered: false)");
                let start = Since { epoch: read.epoch.to_string(), seq: 0 };
                match self.read_entries(topic, Some(&start), page, true).await {
                    Ok(whole) if whole.complete && whole.epoch == read.epoch => {
                        node.reset(topic, whole.epoch.clone(), 0);
                        read = whole;
                    }
                    _ => return node.reset(topic, read.epoch, read.seq),
                }
            }
            let until = *until.get_or_insert(read.seq);
            for (i, entry) in read.entries.iter().enumerate() {
                if let Some(delivery) = self.delivery(read.epoch.clone(), read.first + i as u64, entry) {
                    node.deliver(topic, delivery);
                }
            }
            let read_to = read.first + read.entries.len() as u64;
            if read.entries.is_empty() || read_to > until {
                return;
            }
            (epoch, after) = (read.epoch, read_to - 1);
        }
    }

    /// Hands one pub/sub message to the node.
    async fn on_message(&self, node: &Node, payload: Bytes) {
        match payload.first() {
            Some(b'm') => {
                // m \n topic \n epoch \n seq \n entry
                let Some(([_, topic, epoch, seq], entry)) = fields(&payload) else { return };
                let (Ok(topic), Ok(seq)) = (Topic::new(topic), seq.parse::<u64>()) else { return };
                let Some(delivery) = self.delivery(epoch.into(), seq, &entry) else { return };
                if let Delivered::Gap { epoch, after } = node.deliver(&topic, delivery.clone()) {
                    self.catch_up(node, &topic, &epoch, after).await;
                    node.deliver(&topic, delivery);
                }
            }
            Some(b'u') => {
                // u \n topic: published where Redis has no state of the topic.
                let Some(Ok(topic)) = payload.get(2..).map(|t| std::str::from_utf8(t).map(Topic::new)) else { return };
                let Ok(topic) = topic else { return };
                if !lock(&self.held).contains_key(&topic) {
                    return;
                }
                // Held here, so Redis lost its state (evicted, or expired
                // while unreachable): the catch-up gives it a new epoch and
                // the subscribers a reset, not a silent gap. A subscriber
                // still reading has no position yet: its read does the same.
                let position = node.positions().into_iter().find(|(held, ..)| *held == topic);
                if let Some((topic, epoch, seq)) = position {
                    self.catch_up(node, &topic, &epoch, seq).await;
                }
            }
            Some(b'r') => {
                // r \n topic \n node \n from \n kind \n data (binary data as it is)
                let Some(([_, topic, origin, from, kind], data)) = fields(&payload) else { return };
                if origin == self.node_id {
                    return;
                }
                let Ok(topic) = Topic::new(topic) else { return };
                let message = match kind {
                    "b" => Message::Binary(data),
                    _ => match String::from_utf8(data.to_vec()) {
                        Ok(text) => Message::Text(text.into()),
                        Err(_) => return,
                    },
                };
                node.deliver_raw(&topic, from, message);
            }
            Some(kind @ (b'j' | b'l')) => {
                // j|l \n topic \n node \n peer \n user
                let Some(([_, topic, origin, peer], user)) = fields(&payload) else { return };
                let (Ok(topic), Ok(user)) = (Topic::new(topic), std::str::from_utf8(&user)) else { return };
                if origin == self.node_id {
                    return;
                }
                let who = PresenceEntry { peer: peer.to_owned(), user: (!user.is_empty()).then(|| user.to_owned()) };
                node.presence(&topic, who, *kind == b'j');
            }
            _ => {}
        }
    }

    /// Keeps the command and bulk connections: made once, then each
    /// ConnectionManager reconnects by itself.
    async fn connect(self: Arc<Self>, shutdown: CancellationToken) {
        let config = |response_timeout| {
            redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(COMMAND_TIMEOUT)
                .set_response_timeout(response_timeout)
                .set_number_of_retries(2)
                .set_max_delay(BACKOFF_MAX.as_millis() as u64)
        };
        let mut backoff = BACKOFF_MIN;
        loop {
            let attempt = async {
                let command = ConnectionManager::new_with_config(self.client.clone(), config(COMMAND_TIMEOUT)).await?;
                let mut bulk = Vec::with_capacity(BULK_CONNECTIONS);
                for _ in 0..BULK_CONNECTIONS {
                    bulk.push(ConnectionManager::new_with_config(self.client.clone(), config(BULK_TIMEOUT)).await?);
                }
                redis::RedisResult::Ok(Connections { command, bulk })
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                conn = attempt => match conn {
                    Ok(conn) => {
                        self.connection.send_replace(Some(conn));
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot connect to Redis; retrying"),
                },
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A PING on the command connection and on each bulk one.
    async fn ping_all(&self) -> Result<(), EngineError> {
        let Connections { command, bulk } = self.connections().await?;
        for mut conn in std::iter::once(command).chain(bulk) {
            match tokio::time::timeout(COMMAND_TIMEOUT, redis::cmd("PING").query_async::<()>(&mut conn)).await {
                Ok(result) => result.map_err(unavailable)?,
                Err(_) => return Err(EngineError::Unavailable("Redis did not answer in time".into())),
            }
        }
        Ok(())
    }

    /// The pub/sub connection: subscribes to every shard channel, catches up
    /// every topic this node serves, then delivers; again after any drop.
    async fn listen(self: Arc<Self>, node: Node, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let connected = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                let channels: Vec<String> = (0..SHARD_CHANNELS).map(|i| format!("crosswire:{i}")).collect();
                pubsub.subscribe(channels).await?;
                redis::RedisResult::Ok(pubsub)
            };
            let pubsub = tokio::select! {
                _ = shutdown.cancelled() => return,
                result = tokio::time::timeout(COMMAND_TIMEOUT, connected) => result,
            };
            match pubsub {
                Ok(Ok(pubsub)) => {
                    backoff = BACKOFF_MIN;
                    // The other connections too, before the catch-up reads
                    // and before saying ready: after an outage each reconnects
                    // on its first use, which should not be a client's publish.
                    while let Err(e) = self.ping_all().await {
                        tracing::debug!(error = %e, "Redis commands not answered yet");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(BACKOFF_MIN) => {}
                        }
                    }
                    // Subscribed first, then caught up: whatever was published
                    // while we were away is in the history, whatever comes
                    // next is in the stream, and the node drops the overlap.
                    for (topic, epoch, seq) in node.positions() {
                        self.catch_up(&node, &topic, &epoch, seq).await;
                    }
                    self.subscribed.store(true, Ordering::Relaxed);
                    tracing::info!(node = %self.node_id, "subscribed to Redis");
                    let mut stream = pubsub.into_on_message();
                    loop {
                        let message = tokio::select! {
                            _ = shutdown.cancelled() => return,
                            message = stream.next() => message,
                        };
                        let Some(message) = message else { break };
                        let payload = Bytes::copy_from_slice(message.get_payload_bytes());
                        self.on_message(&node, payload).await;
                    }
                    self.subscribed.store(false, Ordering::Relaxed);
                    tracing::warn!("lost the Redis pub/sub connection; reconnecting");
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot subscribe to Redis; retrying"),
                Err(_) => tracing::warn!("Redis did not answer the subscription in time; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Queues what goes to the other nodes without an answer; past
    /// [`OUTGOING_CAPACITY`] it is dropped (see there).
    fn queue(&self, item: Outgoing) {
        if let Err(e) = self.outgoing.try_send(item) {
            let what = match e.into_inner() {
                Outgoing::Raw { .. } => "a raw message reaches only this node's subscribers",
                Outgoing::Presence { .. } => "a presence change waits for the next renewal",
            };
            tracing::debug!("the queue to Redis is full: {what}");
        }
    }

    /// Sends the queued raw messages and presence changes in their order:
    /// raw messages that follow each other go in one pipeline, a presence
    /// change (a script) on its own, each batch after the one before.
    async fn send_outgoing(self: Arc<Self>, mut queue: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(OUTGOING_BATCH);
        loop {
            let taken = tokio::select! {
                _ = shutdown.cancelled() => return,
                taken = queue.recv_many(&mut batch, OUTGOING_BATCH) => taken,
            };
            if taken == 0 {
                return;
            }
            let mut raw = redis::pipe();
            let mut raws = 0;
            for item in batch.drain(..) {
                match item {
                    Outgoing::Raw { channel, payload } => {
                        raw.publish(channel, payload).ignore();
                        raws += 1;
                    }
                    Outgoing::Presence { topic, peer, value, event } => {
                        self.send_raw(std::mem::replace(&mut raw, redis::pipe()), std::mem::take(&mut raws)).await;
                        let sent = self
                            .run(async |mut conn| {
                                self.presence
                                    .key(presence_key(&topic))
                                    .arg(&peer)
                                    .arg(&value)
                                    .arg(channel(&topic))
                                    .arg(&event)
                                    .invoke_async::<()>(&mut conn)
                                    .await
                            })
                            .await;
                        if let Err(e) = sent {
                            tracing::debug!(error = %e, "a presence change did not reach Redis");
                        }
                    }
                }
            }
            self.send_raw(raw, raws).await;
        }
    }

    /// One pipeline of `count` raw messages' PUBLISHes, if any.
    async fn send_raw(&self, pipe: redis::Pipeline, count: usize) {
        if count == 0 {
            return;
        }
        if let Err(e) = self.run(async |mut conn| pipe.query_async::<()>(&mut conn).await).await {
            tracing::debug!(error = %e, count, "raw messages did not reach the other nodes");
        }
    }

    /// Renews this node's presence entries and the topics its subscribers
    /// hold, so that neither expires while the node lives; on the same tick,
    /// forgets acks whose message never came back.
    async fn renew(self: Arc<Self>, shutdown: CancellationToken) {
        // Often enough for both: presence entries and held topics' epochs.
        let every = (self.presence_ttl.min(self.history_ttl) / 3).max(Duration::from_millis(100));
        let mut ticker = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let entries: Vec<_> =
                lock(&self.present).iter().map(|((t, p), u)| (t.clone(), p.clone(), u.clone())).collect();
            let held: Vec<Topic> = lock(&self.held).keys().cloned().collect();
            let expires = now_ms() + self.presence_ttl.as_millis() as u64;
            let ttl = self.history_ttl.as_millis() as u64;
            // A round trip per batch: a node holding many topics does not put
            // one long pipeline (and its replies) before the publishes that
            // share the command connection.
            for batch in entries.chunks(RENEW_BATCH) {
                let mut pipe = redis::pipe();
                for (topic, peer, user) in batch {
                    pipe.hset(presence_key(topic), peer, self.presence_value(expires, user.as_deref())).ignore();
                }
                let _ = self.run(async |mut conn| pipe.query_async::<()>(&mut conn).await).await;
            }
            for batch in held.chunks(RENEW_BATCH) {
                let mut pipe = redis::pipe();
                for topic in batch {
                    pipe.pexpire(meta_key(topic), ttl as i64).ignore();
                }
                let _ = self.run(async |mut conn| pipe.query_async::<()>(&mut conn).await).await;
            }
            let cutoff = tokio::time::Instant::now().checked_sub(ACK_FORGET);
            if let Some(cutoff) = cutoff {
                lock(&self.acks).retain(|_, (_, at)| *at > cutoff);
            }
        }
    }

    fn presence_value(&self, expires: u64, user: Option<&str>) -> String {
        format!("{}\n{expires}\n{}", self.node_id, user.unwrap_or(""))
    }
}

impl Engine for RedisEngine {
    fn start(&self, node: Node, shutdown: CancellationToken) {
        let shared = &self.shared;
        let _ = shared.node.set(node.clone());
        tokio::spawn(Arc::clone(shared).connect(shutdown.clone()));
        tokio::spawn(Arc::clone(shared).listen(node, shutdown.clone()));
        tokio::spawn(Arc::clone(shared).renew(shutdown.clone()));
        if let Some(outgoing) = lock(&shared.outgoing_rx).take() {
            tokio::spawn(Arc::clone(shared).send_outgoing(outgoing, shutdown));
        }
    }

    fn publish<'a>(&'a self, topic: &'a Topic, publication: Publication<'a>) -> Pending<'a, u64> {
        let Publication { from, data, ack, .. } = publication;
        Pending::later(self.shared.publish(topic, from, data, ack))
    }

    fn broadcast(&self, topic: &Topic, from: &str, message: &Message) {
        let (kind, data): (&str, &[u8]) = match message {
            Message::Text(text) => ("t", text.as_bytes()),
            Message::Binary(data) => ("b", data),
        };
        let mut payload = format!("r\n{topic}\n{}\n{from}\n{kind}\n", self.shared.node_id).into_bytes();
        payload.extend_from_slice(data);
        self.shared.queue(Outgoing::Raw { channel: channel(topic), payload });
    }

    fn read<'a>(
        &'a self,
        topic: &'a Topic,
        since: Option<&'a Since>,
        limit: ReadLimit,
        create: bool,
    ) -> Pending<'a, History> {
        Pending::later(self.shared.read(topic, since, limit, create))
    }

    /// Refuses a topic past `--max-topics` held on this node, as the memory
    /// engine does when none is idle (a topic nobody holds costs a node
    /// nothing here, so there is never one to forget).
    fn hold(&self, topic: &Topic) -> Result<(), EngineError> {
        let mut held = lock(&self.shared.held);
        if let Some(holders) = held.get_mut(topic) {
            *holders += 1;
        } else if held.len() < self.shared.max_topics {
            held.insert(topic.clone(), 1);
        } else {
            return Err(EngineError::TopicLimit { max: self.shared.max_topics });
        }
        Ok(())
    }

    fn release(&self, topic: &Topic) {
        let mut held = lock(&self.shared.held);
        if let Some(n) = held.get_mut(topic) {
            *n -= 1;
            if *n == 0 {
                held.remove(topic);
            }
        }
    }

    fn presence_changed(&self, topic: &Topic, who: &PresenceEntry, joined: bool) {
        let shared = &self.shared;
        let key = (topic.clone(), who.peer.clone());
        if joined {
            lock(&shared.present).insert(key, who.user.clone());
        } else {
            lock(&shared.present).remove(&key);
        }
        let expires = now_ms() + shared.presence_ttl.as_millis() as u64;
        let value = if joined { shared.presence_value(expires, who.user.as_deref()) } else { String::new() };
        let event = format!(
            "{}\n{topic}\n{}\n{}\n{}",
            if joined { "j" } else { "l" },
            shared.node_id,
            who.peer,
            who.user.as_deref().unwrap_or("")
        );
        shared.queue(Outgoing::Presence { topic: topic.clone(), peer: who.peer.clone(), value, event });
    }

    fn remote_presence<'a>(&'a self, topic: &'a Topic) -> Pending<'a, Vec<PresenceEntry>> {
        let shared = &self.shared;
        Pending::later(async move {
            let all: HashMap<String, String> =
                shared.run(async |mut conn| conn.hgetall(presence_key(topic)).await).await?;
            let now = now_ms();
            let mut list = Vec::new();
            for (peer, value) in all {
                let mut parts = value.splitn(3, '\n');
                let (Some(node), Some(expires), Some(user)) = (parts.next(), parts.next(), parts.next()) else {
                    continue;
                };
                if node == shared.node_id || expires.parse::<u64>().map_or(true, |e| e < now) {
                    continue;
                }
                list.push(PresenceEntry { peer, user: (!user.is_empty()).then(|| user.to_owned()) });
            }
            Ok(list)
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed) && self.shared.connection.borrow().is_some()
    }

    fn topic_count(&self) -> usize {
        lock(&self.shared.held).len()
    }
}
