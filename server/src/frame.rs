//! [`Frame`]: one complete server-to-client WebSocket frame, header and
//! payload, encoded once into shared bytes.
//!
//! A published message is framed here once and the same bytes are queued
//! for every subscriber, kept in the topic's history and handed to the
//! socket as one `writev` slice: nothing re-frames or copies it per peer
//! (tungstenite's writer did both, for 13% of the fan-out CPU). Server
//! frames are never masked (RFC 6455 §5.1), so the bytes are the same for
//! every peer.
//!
//! The bytes are an `Arc<[u8]>`, not a `Bytes`: a frame is cloned and
//! dropped once per delivery, and `Bytes` does both through its vtable (an
//! indirect call each, 4% of a chat room's instructions) where an `Arc` is
//! one inlined atomic add or sub. Not an `Arc<Vec<u8>>` either: the count
//! and the bytes are one allocation, so a frame's length and header are read
//! from the cache line its clone just touched, not through a second pointer
//! (and a publish allocates once, not twice). A frame is encoded in the
//! worker's build buffer and copied out once, at its final size; the
//! engine's `message` and `ack` frames, whose length is known before they
//! are written, are written in place ([`Frame::text_in_place`]).

use std::{cell::RefCell, str::Utf8Error, sync::Arc};

/// Opcodes of the frames the server sends (RFC 6455 §5.2).
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xa;

/// The longest header an unmasked frame has: two bytes and a 64-bit length.
const MAX_HEADER: usize = 10;

/// A complete, final, unmasked WebSocket frame, or (made by
/// [`Frame::concat`]) several back to back, which are only ever written.
/// Cloning it is a reference-count bump.
#[derive(Clone)]
pub(crate) struct Frame {
    wire: Arc<[u8]>,
}

/// A build buffer larger than this after a frame is let go, so that one
/// large message does not hold its size on a worker for good.
const BUILD_KEEP: usize = 64 * 1024;

thread_local! {
    /// Where frames are encoded before they are copied out at their size.
    static BUILD: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on an empty build buffer, then copies `buf[start..]` out as the
/// frame, where `f` returns `start`.
fn build<E>(capacity: usize, f: impl FnOnce(&mut Vec<u8>) -> Result<usize, E>) -> Result<Frame, E> {
    BUILD.with(|cell| {
        let Ok(mut buf) = cell.try_borrow_mut() else {
            // Only a serializer calling back into a publish could nest here.
            let mut buf = Vec::with_capacity(capacity);
            let start = f(&mut buf)?;
            return Ok(Frame { wire: Arc::from(&buf[start..]) });
        };
        buf.clear();
        buf.reserve(capacity);
        let built = f(&mut buf).map(|start| Frame { wire: Arc::from(&buf[start..]) });
        if buf.capacity() > BUILD_KEEP {
            *buf = Vec::new();
        }
        built
    })
}

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.as_wire() == other.as_wire()
    }
}

impl Eq for Frame {}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Frame").field("opcode", &self.opcode()).field("len", &self.len()).finish()
    }
}

impl Frame {
    /// A text frame carrying `text`.
    pub(crate) fn text(text: impl AsRef<str>) -> Self {
        Self::encode(TEXT, text.as_ref().as_bytes())
    }

    /// A binary frame carrying `data`.
    pub(crate) fn binary(data: &[u8]) -> Self {
        Self::encode(BINARY, data)
    }

    /// A text frame whose JSON payload `write` appends to the buffer (about
    /// `capacity` bytes), straight behind room left for the header: the
    /// payload is written once and never copied.
    pub(crate) fn json_with(
        capacity: usize,
        write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> serde_json::Result<Self> {
        build(MAX_HEADER + capacity, |buf| {
            buf.resize(MAX_HEADER, 0);
            write(buf)?;
            let len = buf.len() - MAX_HEADER;
            let mut head = [0u8; MAX_HEADER];
            let head_len = header(TEXT, len, &mut head);
            let start = MAX_HEADER - head_len;
            buf[start..MAX_HEADER].copy_from_slice(&head[..head_len]);
            Ok(start)
        })
    }

    /// A text frame of a `len`-byte payload that `write` puts in place, the
    /// way the engine's hand-written JSON frames are made: the length is
    /// known before a byte is written, so the frame is allocated once at its
    /// size, the header goes first, and nothing is copied twice (no build
    /// buffer). `write` must put exactly `len` bytes.
    pub(crate) fn text_in_place(len: usize, write: impl FnOnce(&mut Payload<'_>)) -> Self {
        let mut head = [0u8; MAX_HEADER];
        let head_len = header(TEXT, len, &mut head);
        let mut wire: Arc<[u8]> = std::iter::repeat_n(0, head_len + len).collect();
        let buf = Arc::get_mut(&mut wire).expect("a new Arc is not shared");
        buf[..head_len].copy_from_slice(&head[..head_len]);
        let mut payload = Payload { rest: &mut buf[head_len..] };
        write(&mut payload);
        assert!(payload.rest.is_empty(), "a payload shorter than announced");
        Self { wire }
    }

    /// A ping with an empty payload (the heartbeat's).
    pub(crate) fn ping() -> Self {
        Self::encode(PING, &[])
    }

    /// A pong carrying a ping's payload back (at most 125 bytes: the reader
    /// refuses longer control frames).
    pub(crate) fn pong(payload: &[u8]) -> Self {
        Self::encode(PONG, payload)
    }

    /// A close frame with no code: the echo of a client's close that had none.
    pub(crate) fn close_without_code() -> Self {
        Self::encode(CLOSE, &[])
    }

    /// A close frame with `code` and `reason`; the reason is cut at a
    /// character boundary to the 123 bytes a control frame leaves it.
    pub(crate) fn close(code: u16, reason: &str) -> Self {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        Self::encode(CLOSE, &payload)
    }

    fn encode(opcode: u8, payload: &[u8]) -> Self {
        let mut head = [0u8; MAX_HEADER];
        let head_len = header(opcode, payload.len(), &mut head);
        let Ok(frame) = build::<std::convert::Infallible>(head_len + payload.len(), |buf| {
            buf.extend_from_slice(&head[..head_len]);
            buf.extend_from_slice(payload);
            Ok(0)
        });
        frame
    }

    /// `frames` back to back in one allocation, `len` bytes in all: how
    /// what a gathering poll published to one topic reaches each subscriber,
    /// as one queue entry and one `writev` slice (see `topics::gathered`). One
    /// copy per run, however many subscribers share it. What it makes is a
    /// run of frames, not a frame: only its wire bytes mean anything.
    pub(crate) fn concat<'a>(frames: impl Iterator<Item = &'a Frame>, len: usize) -> Self {
        let Ok(run) = build::<std::convert::Infallible>(len, |buf| {
            for frame in frames {
                buf.extend_from_slice(frame.as_wire());
            }
            Ok(0)
        });
        run
    }

    /// The frames a run (see [`Frame::concat`]) holds, in order; a frame
    /// alone is a run of one.
    #[cfg(test)]
    pub(crate) fn split(&self) -> Vec<Frame> {
        let mut out = Vec::new();
        let mut rest = self.as_wire();
        while !rest.is_empty() {
            let one = Frame { wire: Arc::from(rest) };
            let end = one.head_len() + one.len_declared();
            out.push(Frame { wire: Arc::from(&rest[..end]) });
            rest = &rest[end..];
        }
        out
    }

    /// The payload length the header declares (a run's first frame's).
    #[cfg(test)]
    fn len_declared(&self) -> usize {
        let wire = self.as_wire();
        match wire[1] & 0x7f {
            126 => usize::from(u16::from_be_bytes([wire[2], wire[3]])),
            127 => u64::from_be_bytes(wire[2..10].try_into().expect("eight bytes")) as usize,
            n => usize::from(n),
        }
    }

    /// The frame as it goes on the wire.
    pub(crate) fn as_wire(&self) -> &[u8] {
        &self.wire
    }

    fn head_len(&self) -> usize {
        match self.as_wire()[1] & 0x7f {
            126 => 4,
            127 => 10,
            _ => 2,
        }
    }

    fn opcode(&self) -> u8 {
        self.as_wire()[0] & 0x0f
    }

    /// The payload, without the header.
    pub(crate) fn payload(&self) -> &[u8] {
        &self.as_wire()[self.head_len()..]
    }

    /// The payload's length: what queue bounds and history budgets count.
    pub(crate) fn len(&self) -> usize {
        self.as_wire().len() - self.head_len()
    }

    /// The payload as text, if it is UTF-8 (a text frame's always is).
    pub(crate) fn to_text(&self) -> Result<&str, Utf8Error> {
        std::str::from_utf8(self.payload())
    }

    /// The payload as an owned string (tests read queued frames with it).
    #[cfg(test)]
    pub(crate) fn into_text(self) -> Result<String, Utf8Error> {
        self.to_text().map(str::to_owned)
    }
}

/// What is left to write of a payload (see [`Frame::text_in_place`]).
pub(crate) struct Payload<'a> {
    rest: &'a mut [u8],
}

impl Payload<'_> {
    /// Appends `bytes`. Inlined, so that a constant part is copied by a few
    /// moves, not a `memcpy` call; past the announced length it panics.
    #[inline(always)]
    pub(crate) fn put(&mut self, bytes: &[u8]) {
        let (head, rest) = std::mem::take(&mut self.rest).split_at_mut(bytes.len());
        head.copy_from_slice(bytes);
        self.rest = rest;
    }
}

/// Writes the header of a final, unmasked frame into `out`; returns its length.
fn header(opcode: u8, len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(short) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&short.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_tungstenite::tungstenite::{
        self,
        protocol::{frame::coding::CloseCode, CloseFrame, Role},
        Message,
    };

    /// What tungstenite itself writes for `message` as a server.
    fn tungstenite_bytes(message: Message) -> Vec<u8> {
        let mut ws = tungstenite::WebSocket::from_raw_socket(std::io::Cursor::new(Vec::new()), Role::Server, None);
        ws.send(message).unwrap();
        ws.get_ref().get_ref().clone()
    }

    #[test]
    fn frames_are_byte_identical_to_tungstenites() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            assert_eq!(Frame::text(&text).as_wire(), tungstenite_bytes(Message::text(text.clone())), "text of {len}");
            let data = vec![0xa5; len];
            assert_eq!(
                Frame::binary(&data).as_wire(),
                tungstenite_bytes(Message::binary(data.clone())),
                "binary {len}"
            );
            let json = Frame::json_with(0, |buf| serde_json::to_writer(buf, &text)).unwrap();
            let encoded = serde_json::to_string(&text).unwrap();
            assert_eq!(json.as_wire(), tungstenite_bytes(Message::text(encoded)), "json of {len}");
            // Written in place in parts, cut anywhere.
            let bytes = text.as_bytes();
            let (a, b) = bytes.split_at(len / 3);
            let (b, c) = b.split_at(len / 3);
            let expected = tungstenite_bytes(Message::text(text.clone()));
            let in_parts =
                Frame::text_in_place(len, |payload| [a, b, c].into_iter().for_each(|part| payload.put(part)));
            assert_eq!(in_parts.as_wire(), expected, "parts of {len}");
            assert_eq!(
                Frame::text_in_place(len, |payload| payload.put(bytes)).as_wire(),
                expected,
                "one part of {len}"
            );
        }
        assert_eq!(Frame::ping().as_wire(), tungstenite_bytes(Message::Ping(Default::default())));
        assert_eq!(Frame::pong(b"hi").as_wire(), tungstenite_bytes(Message::Pong(bytes::Bytes::from_static(b"hi"))));
        assert_eq!(Frame::close_without_code().as_wire(), tungstenite_bytes(Message::Close(None)));
        let close = CloseFrame { code: CloseCode::from(1013), reason: "slow consumer".into() };
        assert_eq!(Frame::close(1013, "slow consumer").as_wire(), tungstenite_bytes(Message::Close(Some(close))));
    }

    #[test]
    fn one_frame_shared_by_many_is_the_same_bytes() {
        let frame = Frame::text("{\"type\":\"message\"}");
        let copies: Vec<Frame> = (0..1000).map(|_| frame.clone()).collect();
        let expected = tungstenite_bytes(Message::text("{\"type\":\"message\"}"));
        assert!(copies.iter().all(|c| c.as_wire() == expected && c.as_wire().as_ptr() == frame.as_wire().as_ptr()));
        assert_eq!(frame.to_text(), Ok("{\"type\":\"message\"}"));
        assert_eq!(frame.len(), 18);
    }

    #[test]
    fn a_run_is_its_frames_back_to_back() {
        let frames: Vec<Frame> = [0, 1, 125, 126, 70_000].into_iter().map(|n| Frame::text("x".repeat(n))).collect();
        let len = frames.iter().map(|f| f.as_wire().len()).sum();
        let run = Frame::concat(frames.iter(), len);
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.as_wire().to_vec()).collect();
        assert_eq!(run.as_wire(), expected);
        assert_eq!(run.split(), frames);
    }

    #[test]
    fn a_long_close_reason_is_cut_at_a_character() {
        let frame = Frame::close(1000, &"é".repeat(100));
        assert_eq!(frame.opcode(), CLOSE);
        assert_eq!(frame.len(), 2 + 122);
        assert!(std::str::from_utf8(&frame.payload()[2..]).is_ok());
    }
}
