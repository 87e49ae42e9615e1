//! The `error` frame's codes ([`ErrorCode`]) and why a client frame could
//! not be decoded ([`DecodeError`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Topic;

/// The `code` of an `error` frame: what kind of thing went wrong.
///
/// Codes are stable strings on the wire; a client that meets a code it does
/// not know decodes it as [`ErrorCode::Unknown`] rather than failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame was not valid JSON, had no or an unknown `type`, or lacked a
    /// required field; or a binary frame was sent.
    BadRequest,
    /// A topic name was empty, too long, or had a character outside `[A-Za-z0-9_.:/-]`.
    InvalidTopic,
    /// A message was larger than the server accepts.
    TooLarge,
    /// The peer's permissions do not allow this subscribe or publish.
    Forbidden,
    /// The peer published faster than its allowed rate.
    RateLimited,
    /// The peer is subscribed to as many topics as it may be.
    TooManyTopics,
    /// The server holds as many topics as it may, none of them idle: the
    /// subscribe or publish would have created one more. Or the subscribe
    /// would take the peer's address (or user) past its fair share of the
    /// topic table; the message says which.
    TopicLimit,
    /// The server failed in a way that is not the client's fault.
    Internal,
    /// A `refresh` carried a token the server does not accept (malformed,
    /// wrongly signed, expired, or for another user); the connection keeps its
    /// old token until that one expires.
    Unauthorized,
    /// A `history` request reaches further back than the topic's retained
    /// history (or names another epoch): the messages asked for are gone.
    HistoryUnavailable,
    /// The broker behind the server (Redis) cannot be reached: the publish or
    /// read was not done. Subscriptions stay; retry after a moment.
    EngineUnavailable,
    /// A code this version of the protocol crate does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidTopic => "invalid_topic",
            Self::TooLarge => "too_large",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::TooManyTopics => "too_many_topics",
            Self::TopicLimit => "topic_limit",
            Self::Internal => "internal",
            Self::Unauthorized => "unauthorized",
            Self::HistoryUnavailable => "history_unavailable",
            Self::EngineUnavailable => "engine_unavailable",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A frame that could not be decoded, with what an `error` frame answering it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DecodeError {
    /// The error code to answer with.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The `ack` id of the frame, when it could be read, so the answer reaches
    /// the publisher's pending future.
    pub ack: Option<u64>,
    /// The topic the frame named, when it was a valid one.
    pub topic: Option<Topic>,
}

impl DecodeError {
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self { code: ErrorCode::BadRequest, message: message.into(), ack: None, topic: None }
    }
}
