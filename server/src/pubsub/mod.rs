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

use crosswire_shared::{close_code, ClientFrame, DecodeError, ErrorCode, ServerFrame, Topic, PROTOCOL_VERSION};
use tokio::task::AbortHandle;

use crate::{
    config::ServerConfig,
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
}

/// One connection's state under [`PubSub`]: who it is, what it may do, and
/// its publish budget.
#[derive(Debug)]
pub struct PubSubContext {
    claims: Option<Claims>,
    user: Option<Arc<str>>,
    bucket: Mutex<TokenBucket>,
    /// Subscribe, unsubscribe and presence requests: each changes shared
    /// state or walks a subscriber list, so churn has its own budget.
    churn: Mutex<TokenBucket>,
    expiry: Mutex<Option<AbortHandle>>,
}

impl PubSubContext {
    /// The verified token's claims, when the server authenticates.
    pub fn claims(&self) -> Option<&Claims> {
        self.claims.as_ref()
    }

    fn may_subscribe(&self, topic: &Topic) -> bool {
        self.claims.as_ref().is_none_or(|c| c.may_subscribe(topic))
    }

    fn may_publish(&self, topic: &Topic) -> bool {
        self.claims.as_ref().is_none_or(|c| c.may_publish(topic))
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
        }
    }

    fn handle(&self, peer: &Peer<PubSubContext>, frame: ClientFrame) {
        let session = peer.context();
        if let ClientFrame::Subscribe { topic, .. }
        | ClientFrame::Unsubscribe { topic }
        | ClientFrame::Presence { topic, .. } = &frame
        {
            let mut churn = session.churn.lock().expect("churn bucket lock");
            if !churn.try_take() {
                let message = format!(
                    "subscribe/unsubscribe/presence rate limit of {}/s (burst {}) exceeded; retry in {} ms",
                    self.subscribe_rate,
                    self.subscribe_burst,
                    churn.retry_after().as_millis().max(1)
                );
                drop(churn);
                return error(peer, ErrorCode::RateLimited, message, None, Some(topic.clone()));
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
                if let Err(e) = peer.subscribe_protocol(&topic, since.as_ref(), presence) {
                    error(peer, ErrorCode::TopicLimit, e.to_string(), None, Some(topic));
                }
            }
            ClientFrame::Unsubscribe { topic } => {
                peer.unsubscribe(&topic);
                reply(peer, ServerFrame::Unsubscribed { topic });
            }
            ClientFrame::Publish { topic, data, ack } => {
                if !session.may_publish(&topic) {
                    return forbidden(peer, "publish to", topic, ack);
                }
                let mut bucket = session.bucket.lock().expect("bucket lock");
                if !bucket.try_take() {
                    let message = format!(
                        "publish rate limit of {}/s (burst {}) exceeded; retry in {} ms",
                        self.publish_rate,
                        self.publish_burst,
                        bucket.retry_after().as_millis().max(1)
                    );
                    drop(bucket);
                    return error(peer, ErrorCode::RateLimited, message, ack, Some(topic));
                }
                drop(bucket);
                if let Err(e) = peer.publish_data(&topic, &data, ack) {
                    error(peer, ErrorCode::TopicLimit, e.to_string(), ack, Some(topic));
                }
            }
            ClientFrame::Ping { id } => reply(peer, ServerFrame::Pong { id }),
            ClientFrame::Presence { topic, id } => {
                // Who is in a topic is as private as the topic itself.
                if !session.may_subscribe(&topic) {
                    return forbidden(peer, "see presence of", topic, None);
                }
                let peers = peer.presence(&topic);
                reply(peer, ServerFrame::Presence { topic, id, peers });
            }
        }
    }
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
    reply(peer, ServerFrame::Error { code, message: message.into(), ack, topic });
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
            claims,
            bucket: Mutex::new(TokenBucket::new(self.publish_rate, self.publish_burst)),
            churn: Mutex::new(TokenBucket::new(self.subscribe_rate, self.subscribe_burst)),
            expiry: Mutex::new(None),
        })
    }

    async fn open(&self, peer: &Peer<PubSubContext>) {
        if let Some(user) = &peer.context().user {
            peer.set_user(Arc::clone(user));
        }
        reply(
            peer,
            ServerFrame::Welcome {
                peer: peer.id().to_owned(),
                heartbeat_ms: self.heartbeat.as_millis() as u64,
                version: PROTOCOL_VERSION,
            },
        );
        if let Some(claims) = peer.context().claims() {
            // A token stops being valid mid-connection too.
            let expires_in = claims.expires_in();
            let closer = peer.clone();
            let task = peer.spawn(async move {
                tokio::time::sleep(expires_in).await;
                // The server's verdict: nothing queued goes out after it, and
                // the peer's frames are no longer acted on.
                closer.outbox().close_now(close_code::UNAUTHORIZED, "token expired");
            });
            *peer.context().expiry.lock().expect("expiry lock") = Some(task.abort_handle());
        }
    }

    async fn message(&self, peer: &Peer<PubSubContext>, message: Message) {
        let Message::Text(text) = &message else {
            let message = "binary frames are not part of protocol v1: send JSON text frames";
            return error(peer, ErrorCode::BadRequest, message, None, None);
        };
        match ClientFrame::decode(text) {
            Ok(frame) => self.handle(peer, frame),
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
