//! [`MessageReader`]: what a client sends, from bytes to messages, for the
//! server's side of RFC 6455 (§5), with no read buffer of its own.
//!
//! Why not tungstenite's reader, which the server used before: it allocates
//! its read buffer when the connection opens and keeps it for as long as
//! the peer is connected, and zero-fills it before every read. Under a
//! heap profile that buffer was 4.1 of the 11 KB an idle connection cost,
//! and the zero-filling 3% of the fan-out instructions: exactly the cost a
//! connection pays while nothing moves. The connection reads into a scratch
//! buffer shared by every connection of a worker thread and hands the bytes
//! here; a peer keeps bytes of its own only while a frame or a fragmented
//! message is cut by the end of a read, and only those.
//!
//! The frame codec is still tungstenite's where it fits: its header parser
//! ([`FrameHeader::parse`]), its opcode and close code types, and its
//! [`ProtocolError`]s, so hooks see the same errors as before.
//!
//! The rules are checked as soon as a frame's header is in, before any of
//! its payload is kept: an oversized or forbidden frame costs no memory.
//! Text is checked for UTF-8 as it arrives (a bad byte fails the message at
//! once), and once more as a whole when it completes.

use std::io::Cursor;

use bytes::{Bytes, BytesMut};
use tokio_tungstenite::tungstenite::{
    error::{Error as WsError, ProtocolError},
    protocol::{
        frame::{
            coding::{CloseCode, Control, Data, OpCode},
            FrameHeader,
        },
        CloseFrame,
    },
    Utf8Bytes,
};

/// The longest frame header: two bytes, a 64-bit length and the mask.
const MAX_HEADER: usize = 14;

/// The longest payload a control frame may carry (RFC 6455 §5.5).
const MAX_CONTROL: usize = 125;

/// A complete message or control frame from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// A text message (valid UTF-8).
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
    /// A ping, with the payload the pong must echo.
    Ping(Bytes),
    /// A pong: only a sign of life.
    Pong,
    /// The client's close frame: `None` when it carried no code. A code no
    /// endpoint may send reads as 1002, as tungstenite reported it.
    Close(Option<CloseFrame>),
}

/// Why the client's bytes are not a valid WebSocket stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// A frame, or the message it belongs to, is over the limit (1009).
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooBig {
        /// The size announced so far (a frame's length, plus the fragments before it).
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// A broken protocol rule (1002).
    #[error("{0}")]
    Protocol(ProtocolError),
    /// A frame header tungstenite's parser could not read (1002).
    #[error("unreadable frame header: {0}")]
    Header(String),
    /// Text that is not UTF-8 (1007): a text message, or a close reason.
    #[error("invalid UTF-8 at byte {at}")]
    Utf8 {
        /// Where in the text the first invalid byte is.
        at: usize,
    },
}

/// One connection's reading state: small while the peer is idle (no
/// allocation at all between messages).
#[derive(Debug)]
pub struct MessageReader {
    max_message: usize,
    max_frame: usize,
    /// The start of a frame header a read ended in.
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// The frame whose payload is being read.
    frame: Option<FrameState>,
    /// The data message being put together: fragments so far, or a frame
    /// whose payload did not arrive in one read. Boxed: every connection
    /// has a reader, and most are between messages.
    message: Option<Box<Assembly>>,
    /// A control frame's payload cut by the end of a read (at most 125 bytes).
    control: Vec<u8>,
    /// Set by the client's close or by an error: nothing more is read.
    done: bool,
}

#[derive(Debug)]
struct FrameState {
    opcode: OpCode,
    fin: bool,
    mask: [u8; 4],
    len: usize,
    /// Payload bytes read so far (also where the mask stands).
    read: usize,
}

#[derive(Debug)]
struct Assembly {
    text: bool,
    data: BytesMut,
    /// How much of `data` is known to be valid UTF-8 (text only).
    valid: usize,
}

impl MessageReader {
    /// A reader that refuses messages over `max_message` bytes and frames over `max_frame`.
    pub fn new(max_message: usize, max_frame: usize) -> Self {
        Self {
            max_message,
            max_frame,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            done: false,
        }
    }

    /// Reads `input`, the next bytes from the client, and appends every
    /// message and control frame it completes to `out`, in order. Stops
    /// after the client's close, and at the first error (what came before it
    /// is in `out`); after either, further input is ignored.
    pub fn read(&mut self, mut input: &[u8], out: &mut impl Extend<Received>) -> Result<(), ReadError> {
        let result = self.read_frames(&mut input, out);
        if result.is_err() {
            self.done = true;
            self.frame = None;
            self.message = None;
            self.control = Vec::new();
        }
        result
    }

    fn read_frames(&mut self, input: &mut &[u8], out: &mut impl Extend<Received>) -> Result<(), ReadError> {
        while !self.done {
            if self.frame.is_none() {
                if input.is_empty() {
                    break;
                }
                let Some((header, len)) = self.parse_header(input)? else { break };
                self.begin_frame(header, len)?;
            }
            if !self.read_payload(input, out)? {
                break;
            }
        }
        Ok(())
    }

    /// Whether the reader holds bytes of its own (a frame or message cut by a read).
    #[cfg(test)]
    fn holds_bytes(&self) -> bool {
        self.head_len > 0 || self.message.is_some() || self.control.capacity() > 0
    }

    /// The next frame header and payload length, from the bytes kept from
    /// earlier reads and the start of `input`; `None` (the bytes kept) while
    /// the header is incomplete.
    fn parse_header(&mut self, input: &mut &[u8]) -> Result<Option<(FrameHeader, u64)>, ReadError> {
        let had = self.head_len;
        let take = (MAX_HEADER - had).min(input.len());
        // Straight from `input`, or from the kept bytes with `input`'s first ones after them.
        let bytes: &[u8] = if had == 0 {
            input
        } else {
            self.head[had..had + take].copy_from_slice(&input[..take]);
            &self.head[..had + take]
        };
        let mut cursor = Cursor::new(bytes);
        let parsed = FrameHeader::parse(&mut cursor).map(|h| h.map(|h| (h, cursor.position())));
        match parsed.map_err(protocol_error)? {
            Some((header, end)) => {
                // `end` counts the kept bytes too: the rest came from `input`.
                let used = usize::try_from(end).unwrap_or(usize::MAX).saturating_sub(had).min(input.len());
                *input = &input[used..];
                self.head_len = 0;
                Ok(Some(header))
            }
            None => {
                // Less than a header: `take` is all of `input` (a header is
                // never longer than MAX_HEADER), kept for the next read.
                if had == 0 {
                    self.head[..take].copy_from_slice(&input[..take]);
                }
                self.head_len = had + take;
                *input = &input[take..];
                Ok(None)
            }
        }
    }

    /// Checks a frame's header against the rules and the limits, before any
    /// of its payload is read, in the order tungstenite checks them.
    fn begin_frame(&mut self, header: FrameHeader, len: u64) -> Result<(), ReadError> {
        let size = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_frame as u64 {
            return Err(ReadError::TooBig { size, limit: self.max_frame });
        }
        let Some(mask) = header.mask else {
            return Err(ReadError::Protocol(ProtocolError::UnmaskedFrameFromClient));
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(ReadError::Protocol(ProtocolError::NonZeroReservedBits));
        }
        match header.opcode {
            OpCode::Control(_) if !header.is_final => {
                return Err(ReadError::Protocol(ProtocolError::FragmentedControlFrame))
            }
            OpCode::Control(_) if size > MAX_CONTROL => {
                return Err(ReadError::Protocol(ProtocolError::ControlFrameTooBig))
            }
            OpCode::Control(Control::Reserved(op)) => {
                return Err(ReadError::Protocol(ProtocolError::UnknownControlFrameType(op)))
            }
            OpCode::Control(_) => {}
            OpCode::Data(data) => {
                let so_far = match (data, &self.message) {
                    (Data::Continue, None) => return Err(ReadError::Protocol(ProtocolError::UnexpectedContinueFrame)),
                    (Data::Continue, Some(m)) => m.data.len(),
                    (_, Some(_)) => return Err(ReadError::Protocol(ProtocolError::ExpectedFragment(data))),
                    (Data::Reserved(op), None) => {
                        return Err(ReadError::Protocol(ProtocolError::UnknownDataFrameType(op)))
                    }
                    (Data::Text | Data::Binary, None) => 0,
                };
                if so_far.saturating_add(size) > self.max_message {
                    return Err(ReadError::TooBig { size: so_far.saturating_add(size), limit: self.max_message });
                }
            }
        }
        self.frame = Some(FrameState { opcode: header.opcode, fin: header.is_final, mask, len: size, read: 0 });
        Ok(())
    }

    /// Reads what `input` holds of the current frame's payload; true once
    /// the frame is complete (and handed on), false when `input` ran out first.
    fn read_payload(&mut self, input: &mut &[u8], out: &mut impl Extend<Received>) -> Result<bool, ReadError> {
        let Some(frame) = &mut self.frame else { return Ok(true) };
        let n = (frame.len - frame.read).min(input.len());
        let (chunk, rest) = input.split_at(n);
        *input = rest;
        let whole = frame.read == 0 && n == frame.len;
        let (opcode, fin, mask, phase) = (frame.opcode, frame.fin, frame.mask, frame.read);
        frame.read += n;
        let complete = frame.read == frame.len;
        match opcode {
            OpCode::Control(control) => {
                let payload = if whole {
                    unmasked(chunk, mask, 0).freeze()
                } else {
                    let start = self.control.len();
                    self.control.extend_from_slice(chunk);
                    unmask(&mut self.control[start..], mask, phase);
                    if !complete {
                        return Ok(false);
                    }
                    Bytes::from(std::mem::take(&mut self.control))
                };
                self.frame = None;
                out.extend(Some(self.control_frame(control, payload)?));
            }
            OpCode::Data(data) => {
                if whole && fin && self.message.is_none() {
                    // The usual case: a whole message in one read, copied once.
                    self.frame = None;
                    out.extend(Some(finish(data == Data::Text, unmasked(chunk, mask, 0))?));
                    return Ok(true);
                }
                let message = self.message.get_or_insert_with(|| {
                    Box::new(Assembly {
                        text: data == Data::Text,
                        // A frame's length was checked against the limit: reserve
                        // the part that is here, grow as the rest arrives.
                        data: BytesMut::with_capacity(n),
                        valid: 0,
                    })
                });
                let start = message.data.len();
                message.data.extend_from_slice(chunk);
                unmask(&mut message.data[start..], mask, phase);
                if message.text {
                    message.check_utf8()?;
                }
                if !complete {
                    return Ok(false);
                }
                self.frame = None;
                if fin {
                    if let Some(message) = self.message.take() {
                        out.extend(Some(finish(message.text, message.data)?));
                    }
                }
            }
        }
        Ok(true)
    }

    /// A complete control frame, as what it means.
    fn control_frame(&mut self, control: Control, payload: Bytes) -> Result<Received, ReadError> {
        Ok(match control {
            Control::Ping => Received::Ping(payload),
            Control::Pong => Received::Pong,
            Control::Close => {
                self.done = true;
                Received::Close(close_frame(payload)?)
            }
            // Refused with the header.
            Control::Reserved(op) => return Err(ReadError::Protocol(ProtocolError::UnknownControlFrameType(op))),
        })
    }
}

impl Assembly {
    /// Checks the text received since the last check; a character cut by
    /// the end of what is here waits for the rest.
    fn check_utf8(&mut self) -> Result<(), ReadError> {
        match std::str::from_utf8(&self.data[self.valid..]) {
            Ok(_) => self.valid = self.data.len(),
            Err(e) if e.error_len().is_none() => self.valid += e.valid_up_to(),
            Err(e) => return Err(ReadError::Utf8 { at: self.valid + e.valid_up_to() }),
        }
        Ok(())
    }
}

/// A complete data message.
fn finish(text: bool, data: BytesMut) -> Result<Received, ReadError> {
    let data = data.freeze();
    if !text {
        return Ok(Received::Binary(data));
    }
    Utf8Bytes::try_from(data).map(Received::Text).map_err(|e| ReadError::Utf8 { at: e.valid_up_to() })
}

/// The close frame a close payload holds: empty, or a code and a UTF-8 reason.
fn close_frame(payload: Bytes) -> Result<Option<CloseFrame>, ReadError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(ReadError::Protocol(ProtocolError::InvalidCloseSequence)),
        _ => {
            let code = CloseCode::from(u16::from_be_bytes([payload[0], payload[1]]));
            let reason =
                Utf8Bytes::try_from(payload.slice(2..)).map_err(|e| ReadError::Utf8 { at: e.valid_up_to() })?;
            if !code.is_allowed() {
                // What tungstenite answered a forbidden code with (and the echo carries).
                return Ok(Some(CloseFrame { code: CloseCode::Protocol, reason: "Protocol violation".into() }));
            }
            Ok(Some(CloseFrame { code, reason }))
        }
    }
}

/// tungstenite's header parser fails only on a reserved opcode (reading
/// from memory cannot fail otherwise).
fn protocol_error(error: WsError) -> ReadError {
    match error {
        WsError::Protocol(e) => ReadError::Protocol(e),
        other => ReadError::Header(other.to_string()),
    }
}

/// A copy of `masked`, unmasked.
fn unmasked(masked: &[u8], mask: [u8; 4], phase: usize) -> BytesMut {
    let mut data = BytesMut::from(masked);
    unmask(&mut data, mask, phase);
    data
}

/// Unmasks `data` in place, a word at a time; `phase` is how many payload
/// bytes came before it (where the 4-byte mask stands).
fn unmask(data: &mut [u8], mask: [u8; 4], phase: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(phase + i) % 4]);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = data.chunks_exact_mut(8);
    for chunk in &mut words {
        if let Ok(bytes) = <[u8; 8]>::try_from(&*chunk) {
            chunk.copy_from_slice(&(u64::from_ne_bytes(bytes) ^ word).to_ne_bytes());
        }
    }
    for (i, byte) in words.into_remainder().iter_mut().enumerate() {
        *byte ^= m[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Read, Write};
    use tokio_tungstenite::tungstenite::{
        error::CapacityError,
        protocol::{Role, WebSocket, WebSocketConfig},
        Message,
    };

    const LIMIT: usize = 1000;

    /// One client frame: `opcode` with the FIN bit and RSV bits as given, masked with `mask`.
    fn raw(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut f = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n @ 0..=125 => f.push(m | n as u8),
            n @ 126..=65535 => {
                f.push(m | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        match mask {
            Some(mask) => {
                f.extend(mask);
                f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
            }
            None => f.extend(payload),
        }
        f
    }

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        raw(fin, 0, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    fn text(t: &str) -> Vec<u8> {
        masked(true, 1, t.as_bytes())
    }

    fn close(code: u16, reason: &[u8]) -> Vec<u8> {
        masked(true, 8, &[&code.to_be_bytes()[..], reason].concat())
    }

    /// What the reader makes of `stream` read in one go: everything it
    /// completed, and its error if any.
    fn one_shot(stream: &[u8]) -> (Vec<Received>, Option<ReadError>) {
        chunked(stream, &[stream.len()])
    }

    /// The same, read in pieces of the given lengths (the last takes the rest).
    fn chunked(stream: &[u8], cuts: &[usize]) -> (Vec<Received>, Option<ReadError>) {
        let mut reader = MessageReader::new(LIMIT, LIMIT);
        let mut out = Vec::new();
        let mut rest = stream;
        for (i, &cut) in cuts.iter().enumerate() {
            let n = if i + 1 == cuts.len() { rest.len() } else { cut.min(rest.len()) };
            let (piece, after) = rest.split_at(n);
            rest = after;
            if let Err(e) = reader.read(piece, &mut out) {
                return (out, Some(e));
            }
        }
        (out, None)
    }

    /// tungstenite's reading of the same bytes, as a server with the same
    /// limits: the oracle. A stream that just ends is no error.
    fn oracle(stream: &[u8]) -> (Vec<Received>, Option<ReadError>) {
        struct Pipe(io::Cursor<Vec<u8>>, Vec<u8>);
        impl Read for Pipe {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.0.read(buf)
            }
        }
        impl Write for Pipe {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.1.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let config = WebSocketConfig::default().max_message_size(Some(LIMIT)).max_frame_size(Some(LIMIT));
        let mut ws =
            WebSocket::from_raw_socket(Pipe(io::Cursor::new(stream.to_vec()), vec![]), Role::Server, Some(config));
        let mut out = Vec::new();
        loop {
            let received = match ws.read() {
                Ok(Message::Text(t)) => Received::Text(t),
                Ok(Message::Binary(b)) => Received::Binary(b),
                Ok(Message::Ping(p)) => Received::Ping(p),
                Ok(Message::Pong(_)) => Received::Pong,
                Ok(Message::Close(c)) => {
                    out.push(Received::Close(c));
                    return (out, None);
                }
                Ok(Message::Frame(_)) => unreachable!("a server reads no raw frames"),
                Err(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => return (out, None),
                Err(WsError::Protocol(p)) => return (out, Some(ReadError::Protocol(p))),
                Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                    return (out, Some(ReadError::TooBig { size, limit: max_size }))
                }
                // Where the bad byte is, tungstenite does not say.
                Err(WsError::Utf8(_)) => return (out, Some(ReadError::Utf8 { at: usize::MAX })),
                Err(e) => panic!("unexpected oracle error {e}"),
            };
            out.push(received);
        }
    }

    fn same_as_oracle(stream: &[u8]) -> (Vec<Received>, Option<ReadError>) {
        let ours = one_shot(stream);
        let mut comparable = ours.clone();
        if let Some(ReadError::Utf8 { at }) = &mut comparable.1 {
            *at = usize::MAX;
        }
        assert_eq!(comparable, oracle(stream), "the reader disagrees with tungstenite on {stream:02x?}");
        ours
    }

    /// Every way of cutting `stream` in two, and byte by byte, reads the same as in one go.
    fn cut_anywhere(stream: &[u8]) {
        let whole = one_shot(stream);
        for at in 0..=stream.len() {
            assert_eq!(chunked(stream, &[at, stream.len()]), whole, "cut at {at} of {stream:02x?}");
        }
        assert_eq!(chunked(stream, &vec![1; stream.len() + 1]), whole, "byte by byte: {stream:02x?}");
    }

    fn check(stream: &[u8]) -> (Vec<Received>, Option<ReadError>) {
        cut_anywhere(stream);
        same_as_oracle(stream)
    }

    fn protocol(e: ProtocolError) -> Option<ReadError> {
        Some(ReadError::Protocol(e))
    }

    #[test]
    fn messages_and_control_frames_read_as_tungstenite_reads_them() {
        let stream = [
            text("héllo"),
            masked(true, 2, &[0, 1, 2, 0xff]),
            masked(true, 9, b"are you there"),
            masked(true, 10, b""),
            text(""),
            masked(true, 1, "€".repeat(300).as_bytes()),
            close(1000, b"bye"),
            text("after the close: not read"),
        ]
        .concat();
        let (got, error) = check(&stream);
        assert_eq!(error, None);
        assert_eq!(got.len(), 7, "nothing after the close");
        assert_eq!(got[0], Received::Text("héllo".into()));
        assert_eq!(got[6], Received::Close(Some(CloseFrame { code: CloseCode::Normal, reason: "bye".into() })));
    }

    #[test]
    fn fragments_make_one_message_with_control_frames_between() {
        let euro = "€".as_bytes();
        let stream = [
            masked(false, 1, &[b'a', euro[0]]),
            masked(true, 9, b"p"),
            masked(false, 0, &euro[1..]),
            masked(true, 0, b"z"),
            masked(false, 2, &[1; 300]),
            masked(true, 0, &[2; 300]),
        ]
        .concat();
        let (got, error) = check(&stream);
        assert_eq!(error, None);
        assert_eq!(got[0], Received::Ping(Bytes::from_static(b"p")));
        assert_eq!(got[1], Received::Text("a€z".into()));
        assert_eq!(got[2], Received::Binary([[1; 300], [2; 300]].concat().into()));
    }

    #[test]
    fn each_protocol_rule_fails_as_in_tungstenite() {
        let ok = text("fine");
        let cases: Vec<(Vec<u8>, Option<ReadError>)> = vec![
            (raw(true, 0, 1, b"x", None), protocol(ProtocolError::UnmaskedFrameFromClient)),
            (raw(true, 4, 1, b"x", Some([1, 2, 3, 4])), protocol(ProtocolError::NonZeroReservedBits)),
            (raw(true, 1, 9, b"", Some([1, 2, 3, 4])), protocol(ProtocolError::NonZeroReservedBits)),
            (masked(true, 9, &[0; 126]), protocol(ProtocolError::ControlFrameTooBig)),
            (masked(false, 9, b""), protocol(ProtocolError::FragmentedControlFrame)),
            (masked(true, 0, b"x"), protocol(ProtocolError::UnexpectedContinueFrame)),
            (
                [masked(false, 1, b"a"), masked(true, 2, b"b")].concat(),
                protocol(ProtocolError::ExpectedFragment(Data::Binary)),
            ),
            (close(1000, b"")[..0].to_vec(), None),
            (masked(true, 8, &[3]), protocol(ProtocolError::InvalidCloseSequence)),
        ];
        for op in (3..=7).chain(11..=15) {
            let (got, error) = check(&[ok.clone(), masked(true, op, b"")].concat());
            assert_eq!(got, [Received::Text("fine".into())]);
            assert_eq!(error, protocol(ProtocolError::InvalidOpcode(op)), "opcode {op}");
        }
        for (frame, expected) in cases {
            let (got, error) = check(&[ok.clone(), frame.clone(), ok.clone()].concat());
            assert_eq!(error, expected, "{frame:02x?}");
            assert_eq!(got[0], Received::Text("fine".into()), "what came before an error is read");
            assert_eq!(got.len(), if expected.is_some() { 1 } else { 2 });
        }
    }

    #[test]
    fn text_must_be_utf8_and_fails_at_the_first_bad_byte() {
        for stream in [
            masked(true, 1, b"ok\xffok"),
            [masked(false, 1, b"ok"), masked(true, 0, b"\xc3")].concat(),
            [masked(false, 1, b"ok\xe2\x82"), masked(true, 0, b"x")].concat(),
            close(1000, b"\xff"),
        ] {
            let (got, error) = check(&stream);
            assert!(got.is_empty());
            assert!(matches!(error, Some(ReadError::Utf8 { .. })), "{stream:02x?}: {error:?}");
        }
        // Fail fast: the bad byte is refused before the message (or even its frame) ends.
        let frame = masked(true, 1, &[b"ok\xff".as_slice(), &[b'x'; 500]].concat());
        let mut reader = MessageReader::new(LIMIT, LIMIT);
        assert_eq!(reader.read(&frame[..12], &mut Vec::new()), Err(ReadError::Utf8 { at: 2 }));
        // A bad byte in a binary message is just a byte.
        assert_eq!(check(&masked(true, 2, b"\xff")).0, [Received::Binary(Bytes::from_static(b"\xff"))]);
    }

    #[test]
    fn close_codes_no_endpoint_may_send_read_as_a_protocol_error() {
        for code in [0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000] {
            let (got, error) = check(&close(code, b"why"));
            assert_eq!(error, None);
            assert_eq!(
                got,
                [Received::Close(Some(CloseFrame { code: CloseCode::Protocol, reason: "Protocol violation".into() }))],
                "code {code}"
            );
        }
        for code in [1000, 1001, 1003, 1007, 1011, 1013, 3000, 4999] {
            let (got, _) = check(&close(code, b""));
            assert_eq!(got, [Received::Close(Some(CloseFrame { code: code.into(), reason: "".into() }))]);
        }
        assert_eq!(check(&masked(true, 8, b"")).0, [Received::Close(None)]);
    }

    #[test]
    fn size_limits_are_enforced_at_the_header() {
        let at_limit = masked(true, 2, &[7; LIMIT]);
        assert_eq!(check(&at_limit).0, [Received::Binary(vec![7; LIMIT].into())]);
        let over = masked(true, 2, &[7; LIMIT + 1]);
        assert_eq!(check(&over).1, Some(ReadError::TooBig { size: LIMIT + 1, limit: LIMIT }));
        let fragmented = [masked(false, 1, &[b'a'; 600]), masked(true, 0, &[b'a'; 401])].concat();
        assert_eq!(check(&fragmented).1, Some(ReadError::TooBig { size: LIMIT + 1, limit: LIMIT }));
        // Refused before any of the payload arrives: no memory for it.
        let mut reader = MessageReader::new(LIMIT, LIMIT);
        let header = &raw(true, 0, 2, &[0; 70_000], Some([1, 2, 3, 4]))[..14];
        assert_eq!(reader.read(header, &mut Vec::new()), Err(ReadError::TooBig { size: 70_000, limit: LIMIT }));
        let huge = [0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4];
        assert!(matches!(MessageReader::new(LIMIT, LIMIT).read(&huge, &mut Vec::new()), Err(ReadError::TooBig { .. })));
    }

    #[test]
    fn large_messages_through_every_header_length() {
        let mut reader = MessageReader::new(1 << 20, 1 << 20);
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 300_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let stream = [masked(false, 2, &payload[..len / 3]), masked(true, 0, &payload[len / 3..])].concat();
            let mut out = Vec::new();
            for piece in stream.chunks(4096) {
                reader.read(piece, &mut out).unwrap();
            }
            assert_eq!(out, [Received::Binary(payload.into())], "{len} bytes");
            assert!(!reader.holds_bytes(), "nothing kept between messages");
        }
    }

    #[test]
    fn nothing_is_kept_between_messages_and_only_a_cut_frame_while_one_is_cut() {
        let mut reader = MessageReader::new(LIMIT, LIMIT);
        let stream = [text("one"), masked(true, 9, b"ping"), text("two")].concat();
        let mut out = Vec::new();
        reader.read(&stream[..stream.len() - 3], &mut out).unwrap();
        assert!(reader.holds_bytes(), "the cut text frame");
        reader.read(&stream[stream.len() - 3..], &mut out).unwrap();
        assert!(!reader.holds_bytes());
        assert_eq!(out.len(), 3);
        reader.read(&masked(true, 9, b"ping")[..5], &mut out).unwrap();
        assert!(reader.holds_bytes(), "a cut header");
    }

    #[test]
    fn random_streams_read_the_same_in_any_pieces_and_as_tungstenite_reads_them() {
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let mut stream = Vec::new();
            for _ in 0..next() % 8 {
                let len = [0, 3, 125, 126, 700, 1001][(next() % 6) as usize];
                let payload: Vec<u8> = (0..len).map(|_| [b'a', 0xc3, 0xa9, 0xff][(next() % 4) as usize]).collect();
                let opcode = [0, 1, 2, 8, 9, 10, 3][(next() % 7) as usize];
                let payload =
                    if opcode >= 8 { &payload[..len.min(if next() % 8 == 0 { 126 } else { 125 })] } else { &payload };
                let fin = next() % 3 != 0;
                stream.extend(raw(fin, u8::from(next() % 20 == 0), opcode, payload, Some([next() as u8, 2, 3, 4])));
            }
            let whole = same_as_oracle(&stream);
            let cuts: Vec<usize> = (0..next() % 10).map(|_| (next() % 50) as usize).collect();
            assert_eq!(chunked(&stream, &[cuts, vec![usize::MAX]].concat()), whole, "{stream:02x?}");
        }
    }

    #[test]
    fn unmasking_matches_byte_by_byte_at_every_phase() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..100).collect();
        for phase in 0..8 {
            for len in [0, 1, 7, 8, 9, 31, 100] {
                let mut fast = data[..len].to_vec();
                unmask(&mut fast, mask, phase);
                let slow: Vec<u8> = data[..len].iter().enumerate().map(|(i, b)| b ^ mask[(phase + i) % 4]).collect();
                assert_eq!(fast, slow, "phase {phase}, {len} bytes");
            }
        }
    }
}
