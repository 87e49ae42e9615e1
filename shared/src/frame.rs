//! The frames of protocol v1: [`ClientFrame`] (client to server) and
//! [`ServerFrame`] (server to client), the values they carry ([`Since`],
//! [`PresenceEntry`], [`HistoryMessage`]), and their JSON form: one object per
//! WebSocket text frame, tagged by `"type"`.
//!
//! Frames are decoded through a flat envelope of optional fields (one per
//! direction) rather than serde's internally tagged enums, so that a published `data` stays a borrowed,
//! unparsed slice: the server passes it through without building a JSON tree.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::{DecodeError, ErrorCode, Topic, MAX_TOPIC_LEN};

/// A peer's id as the server assigned it: opaque, unique within one server run.
pub type PeerId = String;

/// Where a subscriber left off in a topic: the topic's history `epoch` and the
/// last `seq` it saw. Sent with `subscribe` to recover what was missed.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Since {
    /// The topic history's epoch the subscriber saw.
    pub epoch: String,
    /// The last sequence number the subscriber saw in that epoch.
    pub seq: u64,
}

/// One subscriber of a topic, as listed by presence.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PresenceEntry {
    /// The subscriber's peer id.
    pub peer: PeerId,
    /// The authenticated user id (the token's `sub`), when the server uses auth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A frame the client sends to the server.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Subscribe to a topic; idempotent. With `since`, ask the server to replay
    /// what was published after that point. With `presence`, also receive
    /// `join`/`leave` events for the topic.
    Subscribe {
        /// The topic.
        topic: Topic,
        /// Where the client left off, to recover missed messages.
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
        /// Opt in to `join`/`leave` events.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        presence: bool,
    },
    /// Stop receiving a topic's messages.
    Unsubscribe {
        /// The topic.
        topic: Topic,
    },
    /// Publish `data` to every other subscriber of `topic`.
    Publish {
        /// The topic.
        topic: Topic,
        /// Any JSON value, passed through verbatim.
        data: Box<RawValue>,
        /// A client-chosen id: the server answers with `ack` (or an `error`
        /// carrying it).
        #[serde(skip_serializing_if = "Option::is_none")]
        ack: Option<u64>,
    },
    /// An application-level ping; browsers cannot see WebSocket pings.
    Ping {
        /// Echoed back in `pong`.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Ask who is subscribed to a topic.
    Presence {
        /// The topic.
        topic: Topic,
        /// Echoed back in the reply.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Hand the server a new token over the open connection, before the
    /// current one expires: answered with `refreshed` (the new expiry) or an
    /// `error` (`unauthorized`) carrying `id`. Nothing is resubscribed.
    Refresh {
        /// The new token.
        token: String,
        /// Echoed back in the answer.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Ask for a topic's retained messages without subscribing: those after
    /// `since` (or the latest ones), at most `limit`. Answered with `history`,
    /// or an `error` (`history_unavailable`, `forbidden`) carrying `id`.
    History {
        /// The topic.
        topic: Topic,
        /// Only messages after this position (same epoch).
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<Since>,
        /// The most messages to return (the oldest after `since`, or the
        /// latest when `since` is absent).
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
        /// Echoed back in the answer.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
}

/// One retained message in a `history` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryMessage {
    /// The message's seq within the topic's epoch.
    pub seq: u64,
    /// The publishing peer.
    pub from: PeerId,
    /// The published JSON, verbatim.
    pub data: Box<RawValue>,
}

/// A frame the server sends to the client.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The first frame on every connection.
    Welcome {
        /// The id the server gave this connection.
        peer: PeerId,
        /// How often the client should send `ping`.
        heartbeat_ms: u64,
        /// The protocol version, [`crate::PROTOCOL_VERSION`].
        version: u32,
        /// When the connection's token expires (seconds since the Unix
        /// epoch), when the server authenticates: a hint for clients whose
        /// tokens they cannot read, to `refresh` in time.
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// A subscribe took effect.
    Subscribed {
        /// The topic.
        topic: Topic,
        /// The topic history's current epoch.
        epoch: String,
        /// The topic's last seq at the time of subscribing (0 if none yet).
        seq: u64,
        /// Whether the `since` given was honoured: the missed messages follow.
        recovered: bool,
    },
    /// An unsubscribe took effect.
    Unsubscribed {
        /// The topic.
        topic: Topic,
    },
    /// A message published to a topic.
    Message {
        /// The topic.
        topic: Topic,
        /// The message's sequence number within the topic.
        seq: u64,
        /// The publishing peer's id (`"server"` for server-side publishes).
        from: PeerId,
        /// The published JSON value, verbatim.
        data: Box<RawValue>,
    },
    /// A publish with an `ack` id was accepted and got `seq`.
    Ack {
        /// The client's ack id.
        ack: u64,
        /// The seq the message got.
        seq: u64,
    },
    /// The answer to `ping`.
    Pong {
        /// The ping's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// Something the client sent was refused; the connection stays open.
    Error {
        /// What kind of error.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
        /// The ack id of the publish this answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        ack: Option<u64>,
        /// The topic of the request this answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        topic: Option<Topic>,
        /// The `id` of the `refresh` or `history` request this answers.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// The answer to a presence request.
    Presence {
        /// The topic.
        topic: Topic,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// Who is subscribed.
        peers: Vec<PresenceEntry>,
    },
    /// A peer subscribed to a topic this client watches presence of.
    Join {
        /// The topic.
        topic: Topic,
        /// Who joined.
        #[serde(flatten)]
        who: PresenceEntry,
    },
    /// A peer left a topic this client watches presence of.
    Leave {
        /// The topic.
        topic: Topic,
        /// Who left.
        #[serde(flatten)]
        who: PresenceEntry,
    },
    /// The answer to `refresh`: the new token was accepted.
    Refreshed {
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The new token's expiry, in seconds since the Unix epoch (absent
        /// when the server does not authenticate).
        #[serde(skip_serializing_if = "Option::is_none")]
        exp: Option<u64>,
    },
    /// The answer to a `history` request.
    History {
        /// The topic.
        topic: Topic,
        /// The request's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        /// The topic history's epoch.
        epoch: String,
        /// The topic's last seq.
        seq: u64,
        /// The retained messages asked for, in seq order: the oldest of the
        /// window asked for that fit the server's answer size (at least one).
        messages: Vec<HistoryMessage>,
        /// Present when more is retained after the last message (the answer
        /// stopped short of the topic's last seq): the seq to ask from next,
        /// as `since: {epoch, seq: next}`. Absent from servers that do not
        /// page (and then every answer is whole).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
    },
}

/// The `data` field kept apart from `Option<&RawValue>`, because an `Option`
/// would read a literal `null` as "missing", and `null` is valid data.
#[derive(Default)]
enum Data<'a> {
    #[default]
    Missing,
    Present(&'a RawValue),
}

impl<'de: 'a, 'a> Deserialize<'de> for Data<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(Data::Present)
    }
}

/// Every field a client frame may carry, all optional. Frames are decoded
/// through a flat envelope rather than serde's internally tagged enums because
/// those buffer the input and cannot borrow `data` as a raw, unparsed slice:
/// the server passes published data through without ever building a JSON tree.
/// It holds the client's fields only (the server's fields, like any other
/// unknown one, are skipped): the server decodes one per frame it receives,
/// and a smaller envelope is less to initialise, move and drop each time.
#[derive(Deserialize)]
struct ClientEnvelope<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "borrowed_str")]
    ty: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    topic: Option<Cow<'a, str>>,
    since: Option<Since>,
    presence: Option<bool>,
    #[serde(default, borrow)]
    data: Data<'a>,
    ack: Option<u64>,
    id: Option<u64>,
    token: Option<String>,
    limit: Option<u32>,
}

/// Every field any server frame may carry, all optional (see [`ClientEnvelope`]
/// for why frames are decoded this way).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", default, borrow, deserialize_with = "borrowed_str")]
    ty: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    topic: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    data: Data<'a>,
    ack: Option<u64>,
    id: Option<u64>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    peer: Option<Cow<'a, str>>,
    heartbeat_ms: Option<u64>,
    version: Option<u32>,
    epoch: Option<String>,
    seq: Option<u64>,
    recovered: Option<bool>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    from: Option<Cow<'a, str>>,
    code: Option<ErrorCode>,
    message: Option<String>,
    peers: Option<Vec<PresenceEntry>>,
    user: Option<String>,
    exp: Option<u64>,
    messages: Option<Vec<HistoryMessage>>,
    next: Option<u64>,
}

/// An optional string that points into the frame unless an escape in it
/// makes that impossible. serde borrows a `Cow<str>` field only when it is
/// exactly that type: inside an `Option` it copied every one, a type and a
/// topic allocated and freed for each frame the server received.
fn borrowed_str<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'a, str>>, D::Error> {
    struct Str;

    impl<'de> serde::de::Visitor<'de> for Str {
        type Value = Option<Cow<'de, str>>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }

        fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Borrowed(v)))
        }

        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v.to_owned())))
        }

        fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
            Ok(Some(Cow::Owned(v)))
        }

        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }

    d.deserialize_option(Str)
}

fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, DecodeError> {
    serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            DecodeError::bad_request(format!("malformed frame: {e}"))
        } else {
            DecodeError::bad_request(format!("invalid JSON: {e}"))
        }
    })
}

fn kind<'a>(ty: &mut Option<Cow<'a, str>>) -> Result<Cow<'a, str>, DecodeError> {
    ty.take().ok_or_else(|| DecodeError::bad_request("frame has no \"type\" field"))
}

/// What both envelopes carry for their errors and payloads: the frame's
/// `ack`, `topic` and `data`, whichever direction it decodes.
trait Fields {
    fn ack(&self) -> Option<u64>;
    fn topic_str(&self) -> Option<&str>;
    fn data_field(&self) -> &Data<'_>;

    /// A frame of type `ty` lacks `field`; the error carries the frame's
    /// `ack` and (valid) topic, so that the client knows what it answers.
    fn missing(&self, ty: &str, field: &str) -> DecodeError {
        DecodeError {
            code: ErrorCode::BadRequest,
            message: format!("a {ty} frame needs a \"{field}\" field"),
            ack: self.ack(),
            topic: self.topic_str().and_then(|t| Topic::new(t).ok()),
        }
    }

    fn topic(&self, ty: &str) -> Result<Topic, DecodeError> {
        let name = self.topic_str().ok_or_else(|| self.missing(ty, "topic"))?;
        Topic::new(name).map_err(|e| DecodeError {
            code: ErrorCode::InvalidTopic,
            message: format!("invalid topic {:?}: {e}", truncate(name)),
            ack: self.ack(),
            topic: None,
        })
    }

    fn data(&self, ty: &str) -> Result<Box<RawValue>, DecodeError> {
        match self.data_field() {
            Data::Present(raw) => Ok((*raw).to_owned()),
            Data::Missing => Err(self.missing(ty, "data")),
        }
    }
}

/// Both envelopes name the three fields alike.
macro_rules! impl_fields {
    ($($envelope:ident),*) => {$(
        impl Fields for $envelope<'_> {
            fn ack(&self) -> Option<u64> {
                self.ack
            }
            fn topic_str(&self) -> Option<&str> {
                self.topic.as_deref()
            }
            fn data_field(&self) -> &Data<'_> {
                &self.data
            }
        }
    )*};
}

impl_fields!(ClientEnvelope, Envelope);

impl Envelope<'_> {
    fn field<T>(&self, ty: &str, name: &str, value: Option<T>) -> Result<T, DecodeError> {
        value.ok_or_else(|| self.missing(ty, name))
    }
}

/// A `publish` frame read in place, borrowing its topic and data from the
/// text it came in: what a server that only passes a publish on needs of
/// it, without the topic's and the data's allocations (a third of what the
/// typed chat room's publish cost beyond the `seed` example's).
///
/// [`PublishRef::read`] takes a publish written the way
/// [`ClientFrame::encode`] writes one, which is how nearly every frame a
/// client sends looks: `{"type":"publish","topic":"<topic>","data":<JSON>}`,
/// with `,"ack":<n>` before the brace. Only `data` goes through serde: the
/// envelope's walk over the keys was 2 800 of the 8 000 instructions a typed
/// publish cost the server. Anything else (whitespace, another key order or
/// another key, an escape in the topic, an invalid topic or number) is
/// `None`, and [`ClientFrame::decode`] decodes it through the envelope, so
/// the two agree on every input they both take (the tests hold them to it).
#[derive(Debug, Clone, Copy)]
pub struct PublishRef<'a> {
    /// Validated as a [`Topic`] is.
    topic: &'a str,
    /// Any JSON value, verbatim.
    pub data: &'a RawValue,
    /// The client's id for the `ack`.
    pub ack: Option<u64>,
}

impl<'a> PublishRef<'a> {
    /// The publish `text` is, when it is written the plain way (see above).
    pub fn read(text: &'a str) -> Option<Self> {
        let rest = after(text, br#"{"type":"publish","topic":""#)?;
        // A valid topic has no escape and no control character, so its JSON
        // string is its text, up to the closing quote.
        let len = crate::topic::allowed_prefix(rest.as_bytes());
        if len == 0 || len > MAX_TOPIC_LEN {
            return None;
        }
        let (topic, rest) = rest.split_at(len);
        let rest = after(rest, br#"","data":"#)?;
        let data = <&RawValue>::deserialize(&mut serde_json::Deserializer::from_str(rest)).ok()?;
        // The value must start right there (no whitespace): then it is the
        // first `len` bytes, and what follows it is the rest.
        if data.get().as_ptr() != rest.as_ptr() {
            return None;
        }
        let rest = &rest[data.get().len()..];
        let ack = match after(rest, br#","ack":"#) {
            Some(number) => Some(plain_u64(number.strip_suffix('}')?)?),
            None if rest == "}" => None,
            None => return None,
        };
        Some(Self { topic, data, ack })
    }

    /// The topic's name, a valid one.
    pub fn topic_name(&self) -> &'a str {
        self.topic
    }

    /// The topic, as an owned [`Topic`].
    pub fn topic(&self) -> Topic {
        Topic::new(self.topic).expect("validated when read")
    }

    /// The owned frame: what [`ClientFrame::decode`] makes of the text.
    pub fn to_frame(&self) -> ClientFrame {
        ClientFrame::Publish { topic: self.topic(), data: self.data.to_owned(), ack: self.ack }
    }
}

/// `text` after `prefix`, if it starts with it. The prefix is an array, so
/// the comparison is a few inlined word compares, not a `memcmp` call.
fn after<'a, const N: usize>(text: &'a str, prefix: &[u8; N]) -> Option<&'a str> {
    let head: &[u8; N] = text.as_bytes().get(..N)?.try_into().ok()?;
    // `prefix` is ASCII, so `N` is a character boundary when it matches.
    (head == prefix).then(|| &text[N..])
}

/// A JSON integer that fits a `u64`, as serde reads one: digits, no
/// leading zero, no sign, fraction or exponent.
fn plain_u64(digits: &str) -> Option<u64> {
    let bytes = digits.as_bytes();
    if bytes.is_empty() || (bytes[0] == b'0' && bytes.len() > 1) {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Keeps error messages short when a client sends a huge bogus name.
fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl ClientFrame {
    /// Decodes one text frame; the error says what to answer with.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        match PublishRef::read(text) {
            Some(publish) => Ok(publish.to_frame()),
            None => Self::decode_envelope(text),
        }
    }

    /// [`Self::decode`] for any frame: through the envelope.
    fn decode_envelope(text: &str) -> Result<Self, DecodeError> {
        let mut env: ClientEnvelope<'_> = parse(text)?;
        let ty = kind(&mut env.ty)?;
        Ok(match &*ty {
            "subscribe" => ClientFrame::Subscribe {
                topic: env.topic("subscribe")?,
                since: env.since.take(),
                presence: env.presence.unwrap_or(false),
            },
            "unsubscribe" => ClientFrame::Unsubscribe { topic: env.topic("unsubscribe")? },
            "publish" => {
                ClientFrame::Publish { topic: env.topic("publish")?, data: env.data("publish")?, ack: env.ack }
            }
            "ping" => ClientFrame::Ping { id: env.id },
            "presence" => ClientFrame::Presence { topic: env.topic("presence")?, id: env.id },
            "refresh" => ClientFrame::Refresh {
                token: env.token.take().ok_or_else(|| env.missing("refresh", "token"))?,
                id: env.id,
            },
            "history" => ClientFrame::History {
                topic: env.topic("history")?,
                since: env.since.take(),
                limit: env.limit,
                id: env.id,
            },
            other => {
                return Err(DecodeError {
                    ack: env.ack,
                    ..DecodeError::bad_request(format!("unknown frame type {:?}", truncate(other)))
                })
            }
        })
    }

    /// Encodes the frame as the JSON text of one WebSocket text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("client frames always serialize")
    }
}

impl ServerFrame {
    /// Decodes one text frame from the server.
    pub fn decode(text: &str) -> Result<Self, DecodeError> {
        let mut env: Envelope<'_> = parse(text)?;
        let ty = kind(&mut env.ty)?;
        let peer = |env: &Envelope<'_>, ty| env.field(ty, "peer", env.peer.as_deref().map(str::to_owned));
        Ok(match &*ty {
            "welcome" => ServerFrame::Welcome {
                peer: peer(&env, "welcome")?,
                heartbeat_ms: env.field("welcome", "heartbeat_ms", env.heartbeat_ms)?,
                version: env.field("welcome", "version", env.version)?,
                exp: env.exp,
            },
            "subscribed" => ServerFrame::Subscribed {
                topic: env.topic("subscribed")?,
                epoch: env.epoch.clone().ok_or_else(|| env.missing("subscribed", "epoch"))?,
                seq: env.field("subscribed", "seq", env.seq)?,
                recovered: env.recovered.unwrap_or(false),
            },
            "unsubscribed" => ServerFrame::Unsubscribed { topic: env.topic("unsubscribed")? },
            "message" => ServerFrame::Message {
                topic: env.topic("message")?,
                seq: env.field("message", "seq", env.seq)?,
                from: env.field("message", "from", env.from.as_deref().map(str::to_owned))?,
                data: env.data("message")?,
            },
            "ack" => {
                ServerFrame::Ack { ack: env.field("ack", "ack", env.ack)?, seq: env.field("ack", "seq", env.seq)? }
            }
            "pong" => ServerFrame::Pong { id: env.id },
            "error" => ServerFrame::Error {
                code: env.code.unwrap_or(ErrorCode::Unknown),
                message: env.message.take().unwrap_or_default(),
                ack: env.ack,
                topic: env.topic.as_deref().and_then(|t| Topic::new(t).ok()),
                id: env.id,
            },
            "refreshed" => ServerFrame::Refreshed { id: env.id, exp: env.exp },
            "history" => ServerFrame::History {
                topic: env.topic("history")?,
                id: env.id,
                epoch: env.epoch.take().ok_or_else(|| env.missing("history", "epoch"))?,
                seq: env.field("history", "seq", env.seq)?,
                messages: env.messages.take().ok_or_else(|| env.missing("history", "messages"))?,
                next: env.next,
            },
            "presence" => ServerFrame::Presence {
                topic: env.topic("presence")?,
                id: env.id,
                peers: env.peers.clone().ok_or_else(|| env.missing("presence", "peers"))?,
            },
            "join" | "leave" => {
                let who = PresenceEntry { peer: peer(&env, &ty)?, user: env.user.take() };
                let topic = env.topic(&ty)?;
                if &*ty == "join" {
                    ServerFrame::Join { topic, who }
                } else {
                    ServerFrame::Leave { topic, who }
                }
            }
            other => return Err(DecodeError::bad_request(format!("unknown frame type {:?}", truncate(other)))),
        })
    }

    /// Encodes the frame as the JSON text of one WebSocket text frame.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> DecodeError {
        ClientFrame::decode(text).unwrap_err()
    }

    /// What the envelope makes of `text`, and whether the shortcut took it
    /// and made the same.
    fn shortcut_agrees(text: &str) -> bool {
        let Some(fast) = PublishRef::read(text).map(|p| p.to_frame()) else { return false };
        let general = ClientFrame::decode_envelope(text)
            .unwrap_or_else(|e| panic!("the shortcut took {text:?}, which the envelope refuses: {e:?}"));
        assert_eq!(fast.encode(), general.encode(), "{text:?}");
        true
    }

    #[test]
    fn a_plain_publish_decodes_as_the_envelope_decodes_it() {
        let topic = Topic::new("room/1").unwrap();
        let datas = [r#""m1.2.3""#, "42", "-1.5e3", "null", r#"{"a":[1,{"b":"\"q\" é"}]}"#, r#""\u00e9\n""#, "[]"];
        for data in datas {
            for ack in [None, Some(0), Some(7), Some(9_999_999_999_999_999_999), Some(u64::MAX)] {
                let frame = ClientFrame::Publish {
                    topic: topic.clone(),
                    data: RawValue::from_string(data.into()).unwrap(),
                    ack,
                };
                let text = frame.encode();
                assert!(shortcut_agrees(&text), "the shortcut takes what encode writes: {text}");
                assert_eq!(ClientFrame::decode(&text).unwrap().encode(), text);
            }
        }
    }

    #[test]
    fn what_the_shortcut_leaves_to_the_envelope_decodes_as_before() {
        let left = [
            r#"{"type":"publish","topic":"a","data":1,"ack":01}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":-1}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":1.0}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":18446744073709551616}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":1,"ack":2}"#,
            r#"{"type":"publish","topic":"a","data":1,"id":3}"#,
            r#"{"type":"publish","topic":"a","data":1 }"#,
            r#"{"type":"publish","topic":"a","data": 1}"#,
            r#"{"type":"publish","topic":"a","data":1}  "#,
            r#"{"type":"publish","topic":"a","data":1}}"#,
            r#"{"type":"publish","topic":"a","data":"x}"#,
            r#"{"type":"publish","topic":"a","data":tru}"#,
            r#"{"type":"publish","topic":"a\u0062","data":1}"#,
            r#"{"type":"publish","topic":"a\"b","data":1}"#,
            r#"{"type":"publish","topic":"","data":1}"#,
            r#"{"type":"publish","topic":"bad topic","data":1}"#,
            r#"{"type":"publish","topic":"a","data":1,"ack":1"#,
            r#"{"type":"publish","topic":"a"}"#,
            r#"{"type":"publish","topic":"a","ack":1,"data":1}"#,
        ];
        for text in left {
            assert!(PublishRef::read(text).is_none(), "the shortcut leaves {text:?}");
        }
        assert_eq!(err(r#"{"type":"publish","topic":"","data":1,"ack":4}"#).ack, Some(4));
        assert_eq!(err(r#"{"type":"publish","topic":"a","data":1,"ack":01}"#).code, ErrorCode::BadRequest);
    }

    /// serde skips over a raw value without counting its depth, so inside
    /// the envelope (one level deeper) or alone, deep data reads the same.
    #[test]
    fn deeply_nested_data_decodes_as_the_envelope_decodes_it() {
        for depth in [100, 126, 127, 128, 129, 200] {
            let data = "[".repeat(depth) + &"]".repeat(depth);
            let text = format!(r#"{{"type":"publish","topic":"a","data":{data}}}"#);
            shortcut_agrees(&text);
            let general = ClientFrame::decode_envelope(&text).map(|f| f.encode());
            assert_eq!(ClientFrame::decode(&text).map(|f| f.encode()), general, "depth {depth}");
        }
    }

    /// Every prefix, and every one-byte change of a plain publish: the
    /// shortcut either leaves the text or makes what the envelope makes.
    #[test]
    fn the_shortcut_agrees_with_the_envelope_on_every_nearby_text() {
        let base = r#"{"type":"publish","topic":"room/1","data":{"k":["v",1]},"ack":1234}"#;
        let mut taken = 0;
        for end in 0..=base.len() {
            taken += usize::from(shortcut_agrees(&base[..end]));
        }
        let replacements = ['"', '\\', '}', '{', ',', ':', ' ', '0', '9', 'a', '-', '.', 'e', ']', '\u{1}', 'é'];
        for at in 0..base.len() {
            for with in replacements {
                let mut text = String::from(&base[..at]);
                text.push(with);
                text.push_str(&base[at + 1..]);
                taken += usize::from(shortcut_agrees(&text));
                let mut inserted = String::from(&base[..at]);
                inserted.push(with);
                inserted.push_str(&base[at..]);
                taken += usize::from(shortcut_agrees(&inserted));
            }
        }
        assert!(taken > 100, "the shortcut took {taken} of the variants");
    }

    /// The envelopes' strings point into the frame unless an escape makes
    /// that impossible: a decoded frame allocates for neither its type nor
    /// its topic (serde's own `Option<Cow<str>>` copied both).
    #[test]
    fn envelope_strings_borrow_unless_escaped() {
        let env: ClientEnvelope<'_> = parse(r#"{"type":"publish","topic":"a/b","data":1}"#).unwrap();
        assert!(matches!(env.ty, Some(Cow::Borrowed("publish"))));
        assert!(matches!(env.topic, Some(Cow::Borrowed("a/b"))));
        let env: ClientEnvelope<'_> = parse(r#"{"type":"publish","topic":"a\/b","data":1}"#).unwrap();
        assert!(matches!(env.topic, Some(Cow::Owned(ref t)) if t == "a/b"));
        let env: Envelope<'_> =
            parse(r#"{"type":"message","topic":"a","from":"p1","peer":"p2","seq":1,"data":1}"#).unwrap();
        assert!(matches!(
            (&env.ty, &env.topic, &env.from, &env.peer),
            (Some(Cow::Borrowed(_)), Some(Cow::Borrowed(_)), Some(Cow::Borrowed(_)), Some(Cow::Borrowed(_)))
        ));
        let env: ClientEnvelope<'_> = parse(r#"{"type":null,"topic":null}"#).unwrap();
        assert!(env.ty.is_none() && env.topic.is_none());
        let Err(e) = parse::<ClientEnvelope<'_>>(r#"{"type":5}"#) else { panic!("a number is no type") };
        assert!(e.message.contains("expected a string"), "{}", e.message);
    }

    #[test]
    fn client_frames_round_trip() {
        let frames = [
            r#"{"type":"subscribe","topic":"a"}"#,
            r#"{"type":"subscribe","topic":"a","since":{"epoch":"e1","seq":4},"presence":true}"#,
            r#"{"type":"unsubscribe","topic":"a"}"#,
            r#"{"type":"publish","topic":"a","data":{"x":[1,2]},"ack":9}"#,
            r#"{"type":"publish","topic":"a","data":null}"#,
            r#"{"type":"ping","id":3}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"presence","topic":"a","id":1}"#,
            r#"{"type":"refresh","token":"t.k.n","id":4}"#,
            r#"{"type":"history","topic":"a","since":{"epoch":"e","seq":3},"limit":10,"id":5}"#,
            r#"{"type":"history","topic":"a"}"#,
        ];
        for text in frames {
            let frame = ClientFrame::decode(text).unwrap();
            assert_eq!(frame.encode(), text, "round trip of {text}");
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let frames = [
            r#"{"type":"welcome","peer":"p1","heartbeat_ms":25000,"version":1}"#,
            r#"{"type":"welcome","peer":"p1","heartbeat_ms":25000,"version":1,"exp":1700000000}"#,
            r#"{"type":"subscribed","topic":"a","epoch":"e","seq":3,"recovered":true}"#,
            r#"{"type":"unsubscribed","topic":"a"}"#,
            r#"{"type":"message","topic":"a","seq":3,"from":"p2","data":"hi"}"#,
            r#"{"type":"ack","ack":1,"seq":2}"#,
            r#"{"type":"pong","id":1}"#,
            r#"{"type":"error","code":"forbidden","message":"no","ack":4,"topic":"a"}"#,
            r#"{"type":"presence","topic":"a","id":2,"peers":[{"peer":"p1","user":"u"},{"peer":"p2"}]}"#,
            r#"{"type":"join","topic":"a","peer":"p1","user":"u"}"#,
            r#"{"type":"leave","topic":"a","peer":"p1"}"#,
            r#"{"type":"error","code":"unauthorized","message":"expired","id":3}"#,
            r#"{"type":"error","code":"history_unavailable","message":"gone","topic":"a","id":4}"#,
            r#"{"type":"refreshed","id":3,"exp":1700000000}"#,
            r#"{"type":"history","topic":"a","id":4,"epoch":"e","seq":9,"messages":[{"seq":8,"from":"p","data":{"x":1}},{"seq":9,"from":"q","data":null}]}"#,
            r#"{"type":"history","topic":"a","id":4,"epoch":"e","seq":9,"messages":[{"seq":3,"from":"p","data":1}],"next":3}"#,
        ];
        for text in frames {
            let frame = ServerFrame::decode(text).unwrap();
            assert_eq!(frame.encode(), text, "round trip of {text}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let f = ClientFrame::decode(r#"{"x":1,"type":"unsubscribe","topic":"t","nested":{"a":[]}}"#).unwrap();
        assert!(matches!(f, ClientFrame::Unsubscribe { .. }));
        // A server frame's fields are not a client frame's: skipped like any other.
        let f = ClientFrame::decode(r#"{"type":"publish","topic":"t","data":1,"seq":"x","peers":3,"ack":2}"#).unwrap();
        assert!(matches!(f, ClientFrame::Publish { ack: Some(2), .. }));
    }

    #[test]
    fn data_is_kept_verbatim() {
        let f = ClientFrame::decode(r#"{"type":"publish","topic":"t","data": { "a" : 1.50 } }"#).unwrap();
        let ClientFrame::Publish { data, .. } = f else { panic!() };
        assert_eq!(data.get(), r#"{ "a" : 1.50 }"#);
    }

    #[test]
    fn bad_input_errors() {
        assert_eq!(err("not json").code, ErrorCode::BadRequest);
        assert!(err("not json").message.starts_with("invalid JSON"));
        assert_eq!(err("[1]").code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"topic":"a"}"#).message, "frame has no \"type\" field");
        assert_eq!(err(r#"{"type":"nope"}"#).message, "unknown frame type \"nope\"");
        assert_eq!(err(r#"{"type":"subscribe"}"#).message, "a subscribe frame needs a \"topic\" field");
        let e = err(r#"{"type":"publish","topic":"a","ack":5}"#);
        assert_eq!((e.code, e.ack, e.topic.unwrap().as_str()), (ErrorCode::BadRequest, Some(5), "a"));
        let e = err(r#"{"type":"publish","topic":"a b","data":1,"ack":6}"#);
        assert_eq!((e.code, e.ack), (ErrorCode::InvalidTopic, Some(6)));
        assert_eq!(err(r#"{"type":"subscribe","topic":""}"#).code, ErrorCode::InvalidTopic);
        assert_eq!(err(r#"{"type":"ping","id":"x"}"#).code, ErrorCode::BadRequest);
        assert_eq!(err(r#"{"type":5}"#).code, ErrorCode::BadRequest);
    }

    #[test]
    fn escaped_strings_decode() {
        let f = ClientFrame::decode(r#"{"type":"sub\u0073cribe","topic":"a\/b"}"#).unwrap();
        let ClientFrame::Subscribe { topic, .. } = f else { panic!() };
        assert_eq!(topic.as_str(), "a/b");
    }

    #[test]
    fn history_answers_read_retained_message_frames() {
        // The server builds the answer from the retained `message` frames as
        // they are; their extra fields are ignored.
        let text = r#"{"type":"history","topic":"a","id":1,"epoch":"e","seq":2,"messages":[{"type":"message","topic":"a","seq":2,"from":"p","data":[1]}]}"#;
        let ServerFrame::History { messages, .. } = ServerFrame::decode(text).unwrap() else { panic!() };
        assert_eq!((messages[0].seq, messages[0].from.as_str(), messages[0].data.get()), (2, "p", "[1]"));
        assert_eq!(err(r#"{"type":"refresh"}"#).message, "a refresh frame needs a \"token\" field");
    }

    #[test]
    fn unknown_error_codes_decode() {
        let f = ServerFrame::decode(r#"{"type":"error","code":"brand_new","message":"m"}"#).unwrap();
        assert!(matches!(f, ServerFrame::Error { code: ErrorCode::Unknown, .. }));
    }
}
