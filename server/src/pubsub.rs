//! [`PubSub`]: the [`Hooks`] implementation that speaks protocol v1, run by
//! the `crosswire-server` binary and spoken by the browser client.

use std::time::Duration;

use crosswire_shared::{ClientFrame, DecodeError, ErrorCode, ServerFrame, Topic, PROTOCOL_VERSION};

use crate::{
    hooks::{Hooks, Message, PeerError, UpgradeRequest},
    Config, HttpResponse, Peer,
};

/// The typed pub/sub protocol of `crosswire-shared`: `welcome` on open, then
/// `subscribe` / `unsubscribe` / `publish` / `ping` / `presence` frames, each
/// answered, every refusal an `error` frame on a connection that stays open.
#[derive(Debug, Clone)]
pub struct PubSub {
    heartbeat: Duration,
}

impl PubSub {
    /// The protocol with the heartbeat `config` announces in `welcome`.
    pub fn new(config: &Config) -> Self {
        Self { heartbeat: config.heartbeat }
    }

    fn handle(&self, peer: &Peer<()>, frame: ClientFrame) {
        match frame {
            ClientFrame::Subscribe { topic, since, presence } => {
                peer.subscribe_protocol(&topic, since.as_ref(), presence);
            }
            ClientFrame::Unsubscribe { topic } => {
                peer.unsubscribe(&topic);
                reply(peer, ServerFrame::Unsubscribed { topic });
            }
            ClientFrame::Publish { topic, data, ack } => {
                let seq = peer.publish_data(&topic, &data);
                if let Some(ack) = ack {
                    reply(peer, ServerFrame::Ack { ack, seq });
                }
            }
            ClientFrame::Ping { id } => reply(peer, ServerFrame::Pong { id }),
            ClientFrame::Presence { topic, id } => {
                let peers = peer.presence(&topic);
                reply(peer, ServerFrame::Presence { topic, id, peers });
            }
            // ClientFrame is non-exhaustive for other crates, not this workspace's
            // decoder, which only yields the variants above.
            #[allow(unreachable_patterns)]
            _ => error(peer, ErrorCode::BadRequest, "unsupported frame", None, None),
        }
    }
}

fn reply(peer: &Peer<()>, frame: ServerFrame) {
    // A full queue already closes the peer (1013); nothing more to do here.
    let _ = peer.send_frame(&frame);
}

fn error(peer: &Peer<()>, code: ErrorCode, message: impl Into<String>, ack: Option<u64>, topic: Option<Topic>) {
    reply(peer, ServerFrame::Error { code, message: message.into(), ack, topic });
}

impl Hooks for PubSub {
    type Context = ();

    async fn upgrade(&self, _request: &UpgradeRequest) -> Result<(), HttpResponse> {
        Ok(())
    }

    async fn open(&self, peer: &Peer<()>) {
        reply(
            peer,
            ServerFrame::Welcome {
                peer: peer.id().to_owned(),
                heartbeat_ms: self.heartbeat.as_millis() as u64,
                version: PROTOCOL_VERSION,
            },
        );
    }

    async fn message(&self, peer: &Peer<()>, message: Message) {
        let Some(text) = message.text() else {
            return error(peer, ErrorCode::BadRequest, "binary frames are not part of protocol v1: send JSON text frames", None, None);
        };
        match ClientFrame::decode(text) {
            Ok(frame) => self.handle(peer, frame),
            Err(DecodeError { code, message, ack, topic }) => error(peer, code, message, ack, topic),
        }
    }

    async fn error(&self, peer: &Peer<()>, err: &PeerError) {
        if let PeerError::MessageTooBig { limit, .. } = err {
            error(peer, ErrorCode::TooLarge, format!("message exceeds the limit of {limit} bytes; closing (1009)"), None, None);
        }
    }
}
