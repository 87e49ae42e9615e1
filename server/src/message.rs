//! [`Message`]: a WebSocket data message as hooks receive and send it, shaped
//! like axum's (`Message::Text` / `Message::Binary`), with its own text type
//! so that no tungstenite type is part of the public API.

use std::{fmt, ops::Deref, str::Utf8Error};

use bytes::Bytes;
use tokio_tungstenite::tungstenite;

/// UTF-8 text that clones without copying (a reference-counted buffer): one
/// message published to many peers is encoded once.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Utf8Bytes(tungstenite::Utf8Bytes);

impl Utf8Bytes {
    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Text from a static string, without copying it.
    pub const fn from_static(text: &'static str) -> Self {
        Self(tungstenite::Utf8Bytes::from_static(text))
    }
}

impl Deref for Utf8Bytes {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Bytes {
    fn from(text: String) -> Self {
        Self(text.into())
    }
}

impl From<&str> for Utf8Bytes {
    fn from(text: &str) -> Self {
        Self(text.into())
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(text: Utf8Bytes) -> Self {
        text.0.into()
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = Utf8Error;

    fn try_from(bytes: Bytes) -> Result<Self, Utf8Error> {
        Ok(Self(bytes.try_into()?))
    }
}

/// A WebSocket data message: text or binary. Control frames (ping, pong,
/// close) are the server's business and never reach the hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Self::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::Binary(data.into())
    }

    /// Whether this is a text message.
    pub fn is_text(&self) -> bool {
        matches!(self, Self::Text(_))
    }

    /// Whether this is a binary message.
    pub fn is_binary(&self) -> bool {
        matches!(self, Self::Binary(_))
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The payload bytes, text or binary.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(text) => text.as_bytes(),
            Self::Binary(data) => data,
        }
    }

    /// The payload as text: a text message's, or a binary one's if it is UTF-8.
    pub fn to_text(&self) -> Result<&str, Utf8Error> {
        match self {
            Self::Text(text) => Ok(text.as_str()),
            Self::Binary(data) => std::str::from_utf8(data),
        }
    }

    /// The payload as text, without copying it.
    pub fn into_text(self) -> Result<Utf8Bytes, Utf8Error> {
        match self {
            Self::Text(text) => Ok(text),
            Self::Binary(data) => data.try_into(),
        }
    }

    /// The payload bytes, text or binary, without copying them.
    pub fn into_data(self) -> Bytes {
        match self {
            Self::Text(text) => text.into(),
            Self::Binary(data) => data,
        }
    }

    /// The message framed once, for as many peers as it goes to.
    pub(crate) fn into_frame(self) -> crate::frame::Frame {
        match self {
            Self::Text(text) => crate::frame::Frame::text(text.as_str()),
            Self::Binary(data) => crate::frame::Frame::binary(&data),
        }
    }

    pub(crate) fn from_text_frame(text: tungstenite::Utf8Bytes) -> Self {
        Self::Text(Utf8Bytes(text))
    }
}

impl From<Utf8Bytes> for Message {
    fn from(text: Utf8Bytes) -> Self {
        Self::Text(text)
    }
}

impl From<&str> for Message {
    fn from(text: &str) -> Self {
        Self::text(text)
    }
}

impl From<String> for Message {
    fn from(text: String) -> Self {
        Self::text(text)
    }
}

impl From<Bytes> for Message {
    fn from(data: Bytes) -> Self {
        Self::Binary(data)
    }
}

impl From<Vec<u8>> for Message {
    fn from(data: Vec<u8>) -> Self {
        Self::binary(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_binary_convert_both_ways() {
        let text = Message::text("héllo");
        assert_eq!(text.to_text(), Ok("héllo"));
        assert_eq!(text.len(), 6);
        assert_eq!(text.clone().into_data(), Bytes::from_static("héllo".as_bytes()));
        let binary = Message::binary(vec![0xff]);
        assert!(binary.to_text().is_err());
        assert_eq!(Message::binary(&b"ok"[..]).into_text().unwrap().as_str(), "ok");
        assert_eq!(text.into_frame().to_text(), Ok("héllo"));
    }
}
