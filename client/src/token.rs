//! Reading a token's expiry, so the client can refresh it before it runs out.
//!
//! Only the `exp` claim of a JWT's payload is read; the signature is not
//! checked (the server does that). A token that is not a JWT simply has no
//! known expiry: the client then relies on the server's 4001 close.

use serde::Deserialize;

/// The `exp` claim (seconds since the Unix epoch) of a JWT, if `token` is one
/// and has it.
///
/// ```
/// // {"alg":"HS256"}.{"sub":"a","exp":1700000000}.signature
/// let token = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIiwiZXhwIjoxNzAwMDAwMDAwfQ.c2ln";
/// assert_eq!(crosswire_client::token::jwt_exp(token), Some(1_700_000_000));
/// assert_eq!(crosswire_client::token::jwt_exp("opaque-token"), None);
/// ```
pub fn jwt_exp(token: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct Payload {
        exp: Option<u64>,
    }
    let mut parts = token.split('.');
    let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let json = base64url_decode(payload)?;
    serde_json::from_slice::<Payload>(&json).ok()?.exp
}

/// Decodes unpadded (or padded) base64url, the alphabet JWTs use.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_known_values() {
        assert_eq!(base64url_decode("").unwrap(), b"");
        assert_eq!(base64url_decode("Zg").unwrap(), b"f");
        assert_eq!(base64url_decode("Zm8").unwrap(), b"fo");
        assert_eq!(base64url_decode("Zm9v").unwrap(), b"foo");
        assert_eq!(base64url_decode("Zm9vYg==").unwrap(), b"foob");
        assert_eq!(base64url_decode("-_8").unwrap(), [0xfb, 0xff]);
        assert_eq!(base64url_decode("a b"), None);
    }

    #[test]
    fn reads_exp_only_from_well_formed_jwts() {
        let payload = |json: &str| {
            // Encode with the standard alphabet, then make it url-safe and unpadded.
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let bytes = json.as_bytes();
            let mut out = String::new();
            for chunk in bytes.chunks(3) {
                let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
                for i in 0..=chunk.len() {
                    out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            format!("h.{out}.s")
        };
        assert_eq!(jwt_exp(&payload(r#"{"sub":"u","exp":42}"#)), Some(42));
        assert_eq!(jwt_exp(&payload(r#"{"sub":"u"}"#)), None);
        assert_eq!(jwt_exp(&payload("not json")), None);
        assert_eq!(jwt_exp("a.b"), None);
        assert_eq!(jwt_exp("a.b.c.d"), None);
    }
}
