//! Topic names ([`Topic`]): validated once, cheap to clone; and the
//! patterns JWT permissions match them with ([`TopicPattern`]).

use std::{borrow::Borrow, fmt, sync::Arc};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 255;

/// A validated topic name: 1 to 255 bytes of `[A-Za-z0-9_.:/-]`.
///
/// Validated once where it enters (decoding a frame, or [`Topic::new`]) and
/// cheap to clone afterwards, because the fan-out path clones it per message.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic(Arc<str>);

/// Why a string is not a valid [`Topic`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidTopic {
    /// The name was empty.
    #[error("topic must not be empty")]
    Empty,
    /// The name was longer than [`MAX_TOPIC_LEN`] bytes.
    #[error("topic is {0} bytes long, the limit is 255")]
    TooLong(usize),
    /// The name contained a character outside `[A-Za-z0-9_.:/-]`.
    #[error("topic contains {0:?}; allowed are A-Z a-z 0-9 _ . : / -")]
    BadChar(char),
}

/// The bytes a topic may hold, `[A-Za-z0-9_.:/-]`, as a table: a publish
/// validates its topic name, so this is read once per byte per message.
const ALLOWED: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'/' | b'-');
        b += 1;
    }
    table
};

impl Topic {
    /// Validates `name` as a topic.
    ///
    /// ```
    /// # use crosswire_shared::Topic;
    /// assert!(Topic::new("chat:lobby").is_ok());
    /// assert!(Topic::new("no spaces").is_err());
    /// ```
    pub fn new(name: &str) -> Result<Self, InvalidTopic> {
        validate(name)?;
        Ok(Self(Arc::from(name)))
    }

    /// The topic name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How many bytes at the start of `text` a topic may hold: where a topic
/// name written in place (a publish read without its envelope) ends.
pub(crate) fn allowed_prefix(text: &[u8]) -> usize {
    text.iter().position(|&b| !ALLOWED[usize::from(b)]).unwrap_or(text.len())
}

fn validate(name: &str) -> Result<(), InvalidTopic> {
    if name.is_empty() {
        return Err(InvalidTopic::Empty);
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(InvalidTopic::TooLong(name.len()));
    }
    // Every allowed byte is ASCII, so the first refused one starts a character.
    match name[allowed_prefix(name.as_bytes())..].chars().next() {
        Some(c) => Err(InvalidTopic::BadChar(c)),
        None => Ok(()),
    }
}

impl TryFrom<&str> for Topic {
    type Error = InvalidTopic;
    fn try_from(name: &str) -> Result<Self, Self::Error> {
        Self::new(name)
    }
}

impl std::str::FromStr for Topic {
    type Err = InvalidTopic;
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::new(name)
    }
}

impl Borrow<str> for Topic {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Topic {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl Serialize for Topic {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Topic {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Topic::new(&name).map_err(serde::de::Error::custom)
    }
}

/// A pattern over topic names, used by permissions: a topic name in which `*`
/// matches any run of characters (including none), e.g. `chat:*` or `*`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct TopicPattern(String);

impl<'de> Deserialize<'de> for TopicPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let pattern = std::borrow::Cow::<'de, str>::deserialize(d)?;
        TopicPattern::new(&pattern).map_err(serde::de::Error::custom)
    }
}

impl TopicPattern {
    /// Makes a pattern; every character other than `*` must be allowed in a topic.
    pub fn new(pattern: &str) -> Result<Self, InvalidTopic> {
        validate(&pattern.replace('*', "x"))?;
        Ok(Self(pattern.to_owned()))
    }

    /// Whether `topic` matches this pattern.
    ///
    /// ```
    /// # use crosswire_shared::{Topic, TopicPattern};
    /// let p = TopicPattern::new("chat:*")?;
    /// assert!(p.matches(&Topic::new("chat:lobby")?));
    /// assert!(!p.matches(&Topic::new("admin")?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn matches(&self, topic: &Topic) -> bool {
        glob(self.0.as_bytes(), topic.as_str().as_bytes())
    }

    /// The pattern text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Iterative wildcard match with backtracking to the last `*`: linear-ish and
/// no recursion, so a hostile pattern in a token cannot blow the stack.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        assert_eq!(Topic::new(""), Err(InvalidTopic::Empty));
        assert_eq!(Topic::new(&"a".repeat(256)), Err(InvalidTopic::TooLong(256)));
        assert!(Topic::new(&"a".repeat(255)).is_ok());
        assert_eq!(Topic::new("a b"), Err(InvalidTopic::BadChar(' ')));
        assert_eq!(Topic::new("é"), Err(InvalidTopic::BadChar('é')));
        assert!(Topic::new("A-z_0.9:/x").is_ok());
    }

    /// The table is `[A-Za-z0-9_.:/-]`, and a refused character after
    /// allowed ones is named whole, however many bytes it has.
    #[test]
    fn every_character_is_judged_by_the_rule() {
        let rule = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-');
        for c in (0..=0x2ffu32).chain([0xfffd, 0x1f600]).filter_map(char::from_u32) {
            let name = format!("ok-{c}-ok");
            let expected = if rule(c) { Ok(()) } else { Err(InvalidTopic::BadChar(c)) };
            assert_eq!(Topic::new(&name).map(|_| ()), expected, "{c:?}");
        }
    }

    #[test]
    fn patterns() {
        let m = |p: &str, t: &str| TopicPattern::new(p).unwrap().matches(&Topic::new(t).unwrap());
        assert!(m("*", "anything"));
        assert!(m("chat:*", "chat:"));
        assert!(m("chat:*", "chat:a/b"));
        assert!(!m("chat:*", "chatx"));
        assert!(m("a*b*c", "axxbyyc"));
        assert!(!m("a*b*c", "axxbyy"));
        assert!(m("exact", "exact"));
        assert!(!m("exact", "exactly"));
        assert!(TopicPattern::new("bad pattern*").is_err());
    }
}
