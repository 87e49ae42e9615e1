//! [`PubSub`]: the [`Hooks`] implementation that speaks protocol v1, run by
//! the `crosswire-server` binary and spoken by the browser client. With a JWT
//! secret configured it authenticates every connection and enforces each
//! token's topic permissions; it always enforces the per-peer limits.
//!
//! Everything of protocol v1 on the server is here or below: the frames, the
//! seq/history/recovery and presence operations (crate-private on
//! [`Peer`]), acks, and the JWT claims ([`auth`]).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crosswire_shared::{
    close_code, ClientFrame, DecodeError, ErrorCode, PublishRef, RawValue, ServerFrame, Topic, PROTOCOL_VERSION,
};
use tokio::{task::AbortHandle, time::Instant};

use crate::{
    config::ServerConfig,
    engine::{EngineError, History, MessageText, Pending, ReadLimit},
    frame::Frame,
    hooks::{CloseDetails, Hooks, PeerError, UpgradeRequest},
    limits::TokenBucket,
    message::Message,
    peer::Peer,
    response::HttpResponse,
};

pub mod auth;

use auth::{Claims, JwtAuth};

/// The typed pub/sub protocol of `crosswire-shared`: `welcome` on open, then
/// `subscribe` / `unsubscribe` / `publish` / `ping` / `presence` frames, each
/// answered, every refusal an `error` frame on a connection that stays open.
#[derive(Debug, Clone)]
pub struct PubSub {
    heartbeat: Duration,
    auth: Option<JwtAuth>,
    max_topics: usize,
    publish_rate: u32,
    publish_burst: u32,
    subscribe_rate: u32,
    subscribe_burst: u32,
    max_history_answer_bytes: usize,
}

/// One connection's state under [`PubSub`]: who it is, what it may do, and
/// its publish budget.
#[derive(Debug)]
pub struct PubSubContext {
    /// Replaced by a `refresh`; a std mutex, only ever held for a lookup.
    claims: Mutex<Option<Claims>>,
    user: Option<Arc<str>>,
    bucket: Mutex<TokenBucket>,
    /// Subscribe, unsubscribe, presence, history and refresh requests: each
    /// changes shared state, walks a subscriber list, reads a history or
    /// verifies a token, so churn has its own budget.
    churn: Mutex<TokenBucket>,
    expiry: Mutex<Option<AbortHandle>>,
}

impl PubSubContext {
    /// The verified token's claims (the latest, after a `refresh`), when the
    /// server authenticates.
    pub fn claims(&self) -> Option<Claims> {
        self.lock_claims().clone()
    }

    fn lock_claims(&self) -> std::sync::MutexGuard<'_, Option<Claims>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn may_subscribe(&self, topic: &Topic) -> bool {
        self.lock_claims().as_ref().is_none_or(|c| c.may_subscribe(topic))
    }

    fn may_publish(&self, topic: &Topic) -> bool {
        self.lock_claims().as_ref().is_none_or(|c| c.may_publish(topic))
    }
}

/// Takes a token from one of a peer's buckets at `now`; when there is none,
/// the `rate_limited` message naming the limit (`rate`/s, `burst`) and the
/// wait.
fn take_token(bucket: &Mutex<TokenBucket>, now: Instant, what: &str, (rate, burst): (u32, u32)) -> Result<(), String> {
    let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
    if bucket.try_take_at(now) {
        return Ok(());
    }
    let retry_ms = bucket.retry_after().as_millis().max(1);
    Err(format!("{what} rate limit of {rate}/s (burst {burst}) exceeded; retry in {retry_ms} ms"))
}

/// The most messages one `history` answer carries.
const MAX_HISTORY_LIMIT: usize = 1_000;

/// Closes `peer` with 4001 when `claims` expire, replacing any earlier timer:
/// a refreshed token moves the deadline.
fn arm_expiry(peer: &Peer<PubSubContext>, claims: &Claims) {
    let expires_in = claims.expires_in();
    let closer = peer.clone();
    let task = peer.spawn(async move {
        tokio::time::sleep(expires_in).await;
        // The server's verdict: nothing queued goes out after it, and the
        // peer's frames are no longer acted on.
        closer.outbox().close_now(close_code::UNAUTHORIZED, "token expired");
    });
    let old = peer.context().expiry.lock().expect("expiry lock").replace(task.abort_handle());
    if let Some(old) = old {
        old.abort();
    }
}

impl PubSub {
    /// The protocol as `config` sets it up: its heartbeat, its JWT secret (if
    /// any) and its per-peer limits.
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            heartbeat: config.heartbeat,
            auth: JwtAuth::from_config(config),
            max_topics: config.max_topics_per_peer,
            publish_rate: config.publish_rate,
            publish_burst: config.publish_burst,
            subscribe_rate: config.subscribe_rate,
            subscribe_burst: config.subscribe_burst,
            max_history_answer_bytes: config.max_history_answer_bytes,
        }
    }

    async fn handle(&self, peer: &Peer<PubSubContext>, frame: ClientFrame) {
        let session = peer.context();
        // What costs more than its answer (shared state, a history read, a
        // token's verification) takes from the churn budget. A `ping` does
        // not: its answer is all it costs, and answers are bounded by the
        // peer's turn (see `outbox`).
        let churn = match &frame {
            ClientFrame::Subscribe { topic, .. } | ClientFrame::Unsubscribe { topic } => Some((Some(topic), None)),
            ClientFrame::Presence { topic, id } | ClientFrame::History { topic, id, .. } => Some((Some(topic), *id)),
            ClientFrame::Refresh { id, .. } => Some((None, *id)),
            ClientFrame::Publish { .. } | ClientFrame::Ping { .. } => None,
        };
        if let Some((topic, id)) = churn {
            let limits = (self.subscribe_rate, self.subscribe_burst);
            let what = "subscribe/unsubscribe/presence/history/refresh";
            if let Err(message) = take_token(&session.churn, Instant::now(), what, limits) {
                let (code, topic) = (ErrorCode::RateLimited, topic.cloned());
                return reply(peer, ServerFrame::Error { code, message, ack: None, topic, id });
            }
        }
        match frame {
            ClientFrame::Subscribe { topic, since, presence } => {
                if !session.may_subscribe(&topic) {
                    return forbidden(peer, "subscribe to", topic, None);
                }
                if !peer.is_subscribed(&topic) && peer.topics().len() >= self.max_topics {
                    let message = format!("a peer may be subscribed to at most {} topics", self.max_topics);
                    return error(peer, ErrorCode::TooManyTopics, message, None, Some(topic));
                }
                if let Err(e) = peer.subscribe_protocol(&topic, since.as_ref(), presence).await {
                    engine_error(peer, &e, None, topic);
                }
            }
            ClientFrame::Unsubscribe { topic } => {
                peer.unsubscribe(&topic);
                reply(peer, ServerFrame::Unsubscribed { topic });
            }
            ClientFrame::Publish { topic, data, ack } => {
                let subscribed = peer.is_subscribed(&topic);
                if let Some(answer) = self.publish(peer, &topic, subscribed, &data, ack) {
                    published(peer, answer.await, ack, &topic);
                }
            }
            ClientFrame::Ping { id } => reply(peer, ServerFrame::Pong { id }),
            ClientFrame::Presence { topic, id } => {
                // Who is in a topic is as private as the topic itself.
                if !session.may_subscribe(&topic) {
                    return forbidden(peer, "see presence of", topic, None);
                }
                match peer.presence(&topic).await {
                    Ok(peers) => reply(peer, ServerFrame::Presence { topic, id, peers }),
                    Err(e) => {
                        let code = engine_code(&e);
                        reply(
                            peer,
                            ServerFrame::Error { code, message: e.to_string(), ack: None, topic: Some(topic), id },
                        )
                    }
                }
            }
            ClientFrame::Refresh { token, id } => self.refresh(peer, &token, id),
            ClientFrame::History { topic, since, limit, id } => {
                // Reading a topic's history is reading the topic.
                if !session.may_subscribe(&topic) {
                    let message = format!("your token does not allow you to read the history of {topic:?}");
                    return reply(
                        peer,
                        ServerFrame::Error { code: ErrorCode::Forbidden, message, ack: None, topic: Some(topic), id },
                    );
                }
                let messages = limit.map_or(MAX_HISTORY_LIMIT, |l| (l as usize).min(MAX_HISTORY_LIMIT));
                // The answer is an answer: counted in the asker's queue,
                // never a reason to cut it, and within what that queue can
                // still take (at least one message).
                let cap = self.max_history_answer_bytes.min(peer.outbox().room());
                let envelope = HistoryAnswer::envelope(&topic, id, "", 0);
                let bytes = cap.saturating_sub(envelope + HistoryAnswer::MAX_TAIL);
                match peer.history(&topic, since.as_ref(), ReadLimit { messages, bytes }).await {
                    Err(e) => {
                        let code = engine_code(&e);
                        reply(
                            peer,
                            ServerFrame::Error { code, message: e.to_string(), ack: None, topic: Some(topic), id },
                        )
                    }
                    Ok(Some(history)) => {
                        let answer = HistoryAnswer::new(&topic, id, history, cap);
                        let _ = peer.send_answer(answer.into_frame());
                    }
                    Ok(None) => {
                        let message = match &since {
                            Some(s) => format!(
                                "the history of {topic:?} no longer reaches back to seq {} of epoch {}",
                                s.seq, s.epoch
                            ),
                            None => format!("no history of {topic:?}"),
                        };
                        let code = ErrorCode::HistoryUnavailable;
                        reply(peer, ServerFrame::Error { code, message, ack: None, topic: Some(topic), id });
                    }
                }
            }
        }
    }
}

impl PubSub {
    /// A publish, once decoded: checked against the token and the rate
    /// limit, then handed to the engine, whose answer is returned to be
    /// awaited and given to [`published`]; `None` when it was refused (the
    /// error is sent). `subscribed`: whether the peer is subscribed to
    /// `topic`. Not an `async fn`, so that a publish is one future fewer
    /// per message.
    fn publish<'a>(
        &self,
        peer: &'a Peer<PubSubContext>,
        topic: &'a Topic,
        subscribed: bool,
        data: &'a RawValue,
        ack: Option<u64>,
    ) -> Option<Pending<'a, u64>> {
        let session = peer.context();
        // Without a JWT secret there are no claims to look up.
        if self.auth.is_some() && !session.may_publish(topic) {
            forbidden(peer, "publish to", topic.clone(), ack);
            return None;
        }
        // One clock read for the rate limit and the history entry's age.
        let now = Instant::now();
        let limits = (self.publish_rate, self.publish_burst);
        if let Err(message) = take_token(&session.bucket, now, "publish", limits) {
            error(peer, ErrorCode::RateLimited, message, ack, Some(topic.clone()));
            return None;
        }
        Some(peer.publish_data(topic, subscribed, data, ack, now))
    }

    /// A new token over the open connection: verified like the one of the
    /// upgrade, for the same user; it replaces the session's permissions and
    /// moves its expiry. Subscriptions the new token no longer allows end,
    /// each with a `forbidden` error naming the topic.
    fn refresh(&self, peer: &Peer<PubSubContext>, token: &str, id: Option<u64>) {
        let refused = |message: String| {
            reply(peer, ServerFrame::Error { code: ErrorCode::Unauthorized, message, ack: None, topic: None, id })
        };
        let Some(auth) = &self.auth else {
            // Nothing to refresh: the connection never expires.
            return reply(peer, ServerFrame::Refreshed { id, exp: None });
        };
        let claims = match auth.verify(token) {
            Ok(claims) => claims,
            Err(e) => return refused(format!("refresh refused: {e}")),
        };
        let session = peer.context();
        if session.user.as_deref() != Some(claims.sub.as_str()) {
            return refused("refresh refused: the new token is for another user".to_owned());
        }
        let exp = claims.exp;
        arm_expiry(peer, &claims);
        *session.lock_claims() = Some(claims.clone());
        for topic in peer.topics() {
            if !claims.may_subscribe(&topic) {
                peer.unsubscribe(&topic);
                let message = format!("your new token does not allow you to subscribe to {topic:?}");
                reply(
                    peer,
                    ServerFrame::Error { code: ErrorCode::Forbidden, message, ack: None, topic: Some(topic), id: None },
                );
            }
        }
        reply(peer, ServerFrame::Refreshed { id, exp: Some(exp) });
    }
}

/// A `history` answer: `ServerFrame::History`'s JSON, with the retained
/// `message` frames spliced in as they are (their `type` and `topic` are
/// ignored by a decoder), not decoded and encoded again, written once into
/// the frame at its size.
struct HistoryAnswer {
    head: String,
    messages: Vec<(u64, MessageText)>,
    next: Option<u64>,
}

impl HistoryAnswer {
    /// The most bytes the end takes: `],"next":` and a `u64`, and `}`.
    const MAX_TAIL: usize = 2 + 8 + 20;

    /// The answer to a request with `id`, for the oldest messages of
    /// `history` that fit `cap` bytes in all (at least one): the rest is
    /// left for the next page.
    fn new(topic: &Topic, id: Option<u64>, history: History, cap: usize) -> Self {
        let next = history.next();
        let History { epoch, seq, mut messages, .. } = history;
        let head = Self::head(topic, id, &epoch, seq);
        let mut this = Self { head, messages: Vec::new(), next };
        let mut len = this.head.len() + Self::MAX_TAIL + messages.iter().map(|(_, f)| f.len() + 1).sum::<usize>();
        while len > cap && messages.len() > 1 {
            let (_, dropped) = messages.pop().expect("more than one");
            len -= dropped.len() + 1;
            this.next = messages.last().map(|(s, _)| *s);
        }
        this.messages = messages;
        this
    }

    /// The bytes of the envelope before the messages.
    fn envelope(topic: &Topic, id: Option<u64>, epoch: &str, seq: u64) -> usize {
        Self::head(topic, id, epoch, seq).len()
    }

    fn head(topic: &Topic, id: Option<u64>, epoch: &str, seq: u64) -> String {
        let mut head = String::with_capacity(96);
        head.push_str(r#"{"type":"history","topic":"#);
        head.push_str(&serde_json::to_string(topic).expect("a topic serializes"));
        if let Some(id) = id {
            head.push_str(&format!(r#","id":{id}"#));
        }
        head.push_str(r#","epoch":"#);
        head.push_str(&serde_json::to_string(epoch).expect("a string serializes"));
        head.push_str(&format!(r#","seq":{seq},"messages":["#));
        head
    }

    fn into_frame(self) -> Frame {
        let tail = match self.next {
            Some(next) => format!(r#"],"next":{next}}}"#),
            None => "]}".to_owned(),
        };
        let commas = self.messages.len().saturating_sub(1);
        let len = self.head.len() + self.messages.iter().map(|(_, f)| f.len()).sum::<usize>() + commas + tail.len();
        Frame::text_in_place(len, |payload| {
            payload.put(self.head.as_bytes());
            for (i, (_, frame)) in self.messages.iter().enumerate() {
                if i > 0 {
                    payload.put(b",");
                }
                payload.put(frame.as_str().as_bytes());
            }
            payload.put(tail.as_bytes());
        })
    }
}

/// `ServerFrame::Welcome`'s JSON (a test holds them equal), written field by
/// field straight into the frame, as the engine writes its `message` frames:
/// one per connection, where the derived serializer took a copy of the peer
/// id, a `String`, and escaped every constant key byte by byte.
fn write_welcome(buf: &mut Vec<u8>, peer: &str, heartbeat_ms: u64, exp: Option<u64>) -> serde_json::Result<()> {
    buf.extend_from_slice(br#"{"type":"welcome","peer":"#);
    serde_json::to_writer(&mut *buf, peer)?;
    buf.extend_from_slice(br#","heartbeat_ms":"#);
    serde_json::to_writer(&mut *buf, &heartbeat_ms)?;
    buf.extend_from_slice(br#","version":"#);
    serde_json::to_writer(&mut *buf, &PROTOCOL_VERSION)?;
    if let Some(exp) = exp {
        buf.extend_from_slice(br#","exp":"#);
        serde_json::to_writer(&mut *buf, &exp)?;
    }
    buf.push(b'}');
    Ok(())
}

fn reply(peer: &Peer<PubSubContext>, frame: ServerFrame) {
    // A full queue already closes the peer (1013); nothing more to do here.
    let _ = peer.send_frame(&frame);
}

fn error(
    peer: &Peer<PubSubContext>,
    code: ErrorCode,
    message: impl Into<String>,
    ack: Option<u64>,
    topic: Option<Topic>,
) {
    reply(peer, ServerFrame::Error { code, message: message.into(), ack, topic, id: None });
}

/// The error code telling a client why the engine did not do what it asked.
fn engine_code(e: &EngineError) -> ErrorCode {
    match e {
        EngineError::TopicLimit { .. } | EngineError::TopicShare { .. } => ErrorCode::TopicLimit,
        EngineError::Unavailable(_) => ErrorCode::EngineUnavailable,
    }
}

/// What the engine answered to a publish of `topic` (see [`PubSub::publish`]).
fn published(peer: &Peer<PubSubContext>, answer: Result<u64, EngineError>, ack: Option<u64>, topic: &Topic) {
    match answer {
        Ok(_) => peer.note_published(),
        Err(e) => engine_error(peer, &e, ack, topic.clone()),
    }
}

fn engine_error(peer: &Peer<PubSubContext>, e: &EngineError, ack: Option<u64>, topic: Topic) {
    error(peer, engine_code(e), e.to_string(), ack, Some(topic));
}

fn forbidden(peer: &Peer<PubSubContext>, what: &str, topic: Topic, ack: Option<u64>) {
    let message = format!("your token does not allow you to {what} {topic:?}");
    error(peer, ErrorCode::Forbidden, message, ack, Some(topic));
}

impl Hooks for PubSub {
    type Context = PubSubContext;

    async fn upgrade(&self, request: &UpgradeRequest) -> Result<PubSubContext, HttpResponse> {
        let claims = match &self.auth {
            Some(auth) => Some(auth.authenticate(request).map_err(|e| {
                tracing::debug!(remote = %request.remote_addr(), error = %e, "authentication failed");
                e.response()
            })?),
            None => None,
        };
        Ok(PubSubContext {
            user: claims.as_ref().map(|c| Arc::from(c.sub.as_str())),
            claims: Mutex::new(claims),
            bucket: Mutex::new(TokenBucket::new(self.publish_rate, self.publish_burst)),
            churn: Mutex::new(TokenBucket::new(self.subscribe_rate, self.subscribe_burst)),
            expiry: Mutex::new(None),
        })
    }

    async fn open(&self, peer: &Peer<PubSubContext>) {
        if let Some(user) = &peer.context().user {
            peer.set_user(Arc::clone(user));
        }
        let heartbeat_ms = self.heartbeat.as_millis() as u64;
        let exp = peer.context().lock_claims().as_ref().map(|c| c.exp);
        // A full queue already closes the peer (1013); nothing more to do here.
        let _ = peer.send_json(96, |buf| write_welcome(buf, peer.id(), heartbeat_ms, exp));
        if let Some(claims) = peer.context().claims() {
            // A token stops being valid mid-connection too (unless refreshed).
            arm_expiry(peer, &claims);
        }
    }

    async fn message(&self, peer: &Peer<PubSubContext>, message: Message) {
        let Message::Text(text) = &message else {
            let message = "binary frames are not part of protocol v1: send JSON text frames";
            return error(peer, ErrorCode::BadRequest, message, None, None);
        };
        // Nearly every frame is a publish written the plain way: read in
        // place, and to a topic the peer is subscribed to, it needs no
        // allocation before the engine's (the topic is the subscription's).
        if let Some(publish) = PublishRef::read(text) {
            let (topic, subscribed) = match peer.subscription(publish.topic_name()) {
                Some(topic) => (topic, true),
                None => (publish.topic(), false),
            };
            if let Some(answer) = self.publish(peer, &topic, subscribed, publish.data, publish.ack) {
                published(peer, answer.await, publish.ack, &topic);
            }
            return;
        }
        match ClientFrame::decode(text) {
            // Boxed: this future is made for every message, and without the
            // box it would be as large as the largest of `handle`'s (a
            // history answer's), where a publish needs a fraction of that.
            Ok(frame) => Box::pin(self.handle(peer, frame)).await,
            Err(DecodeError { code, message, ack, topic }) => error(peer, code, message, ack, topic),
        }
    }

    async fn close(&self, peer: &Peer<PubSubContext>, _details: CloseDetails) {
        if let Some(task) = peer.context().expiry.lock().expect("expiry lock").take() {
            task.abort();
        }
    }

    async fn error(&self, peer: &Peer<PubSubContext>, err: &PeerError) {
        if let PeerError::MessageTooBig { limit, .. } = err {
            let message = format!("message exceeds the limit of {limit} bytes; closing (1009)");
            error(peer, ErrorCode::TooLarge, message, None, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `history` answer decodes as one, stays within its cap (but for one
    /// message alone), and says where the rest follows.
    #[test]
    fn a_history_answer_stays_within_its_cap_and_says_where_to_go_on() {
        let topic = Topic::new("room").unwrap();
        let data = serde_json::value::to_raw_value(&"x".repeat(100)).unwrap();
        let retained: Vec<_> = (1..=10).map(|seq| (seq, MessageText::encode(&topic, seq, "p", &data))).collect();
        let history = |messages: &[(u64, MessageText)]| History {
            epoch: Arc::from("e1"),
            seq: 12,
            complete: true,
            messages: messages.to_vec(),
        };
        for (cap, id, kept) in [(usize::MAX, Some(7), 10), (700, None, 3), (1, Some(1), 1)] {
            let frame = HistoryAnswer::new(&topic, id, history(&retained), cap).into_frame();
            let text = frame.to_text().unwrap();
            assert!(text.len() <= cap || kept == 1, "{} bytes over a cap of {cap}", text.len());
            let ServerFrame::History { topic: t, id: i, epoch, seq, messages, next } =
                ServerFrame::decode(text).unwrap()
            else {
                panic!()
            };
            assert_eq!((t, i, epoch.as_str(), seq), (topic.clone(), id, "e1", 12));
            assert_eq!(messages.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=kept as u64).collect::<Vec<_>>());
            assert_eq!(next, Some(kept as u64), "more is retained after the last one");
        }
        let whole = History { seq: 10, ..history(&retained) };
        let text = HistoryAnswer::new(&topic, None, whole, usize::MAX).into_frame();
        let ServerFrame::History { next, .. } = ServerFrame::decode(text.to_text().unwrap()).unwrap() else { panic!() };
        assert_eq!(next, None, "nothing more retained");
    }

    #[test]
    fn welcome_is_the_derived_encoding() {
        for (peer, heartbeat_ms, exp) in [("0123456789ab", 25_000, None), ("a\"b\\c\u{1}", 0, Some(u64::MAX))] {
            let mut buf = Vec::new();
            write_welcome(&mut buf, peer, heartbeat_ms, exp).unwrap();
            let derived =
                ServerFrame::Welcome { peer: peer.to_owned(), heartbeat_ms, version: PROTOCOL_VERSION, exp }.encode();
            assert_eq!(String::from_utf8(buf).unwrap(), derived);
        }
    }
}
