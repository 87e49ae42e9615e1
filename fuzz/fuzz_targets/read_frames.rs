//! Any bytes a client sends, cut into reads anywhere, must read without a
//! panic, and to the same messages and error as the same bytes in one read:
//! where a read ends must never change what the server hears.
#![no_main]

use crosswire_server::message_reader::{MessageReader, ReadError, Received};
use libfuzzer_sys::fuzz_target;

/// Small limits, so that the limits are reached too.
const LIMIT: usize = 300;

fn read(stream: &[u8], cuts: &[u8]) -> (Vec<Received>, Option<ReadError>) {
    let mut reader = MessageReader::new(LIMIT, LIMIT);
    let mut out = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter();
    while !rest.is_empty() {
        let n = cuts.next().map_or(rest.len(), |&c| usize::from(c).min(rest.len()));
        let (piece, after) = rest.split_at(n);
        rest = after;
        if let Err(e) = reader.read(piece, &mut out) {
            return (out, Some(e));
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    // The first byte says how many of the next bytes are read lengths; the rest is the stream.
    let Some((&n, rest)) = data.split_first() else { return };
    let (cuts, stream) = rest.split_at(usize::from(n % 32).min(rest.len()));
    let whole = read(stream, &[]);
    assert_eq!(read(stream, cuts), whole, "cut into {cuts:?}");
    assert_eq!(read(stream, &vec![1; stream.len()]), whole, "byte by byte");
});
