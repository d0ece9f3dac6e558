//! Password hashes for AUTH, and the base64 of SASL exchanges (RFC 4954, RFC 4648).
//!
//! The stored form is `sha256:<salt-hex>:<hex(sha256(salt || password))>`. A salted SHA-256
//! is fast to brute-force offline, so it is only suitable for long random machine passwords
//! (the usual case for a submission account on a relay); the format names its algorithm so a
//! slow KDF can be added beside it without breaking existing entries.

use sha2::{Digest, Sha256};

const SCHEME: &str = "sha256";

/// The stored form of `password` with `salt`: `sha256:<salt-hex>:<hex(sha256(salt ||
/// password))>`.
///
/// Use a fresh random salt of 16 bytes or more per user.
pub fn hash_password(salt: &[u8], password: &str) -> String {
    format!("{SCHEME}:{}:{}", hex::encode(salt), hex::encode(digest(salt, password)))
}

/// Whether `password` matches a hash made by [`hash_password`]. A malformed `stored` value
/// never matches. The digest comparison takes the same time wherever the first difference is.
pub fn verify_password(stored: &str, password: &str) -> bool {
    let mut parts = stored.splitn(3, ':');
    let (Some(SCHEME), Some(salt), Some(expected)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(salt), Ok(expected)) = (hex::decode(salt), hex::decode(expected)) else {
        return false;
    };
    let actual = digest(&salt, password);
    expected.len() == actual.len()
        && expected.iter().zip(actual.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn digest(salt: &[u8], password: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    hasher.finalize().into()
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub(crate) fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard base64: padding required, no whitespace, no non-zero trailing bits.
pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks(4).enumerate() {
        let last = q + 1 == quads;
        let pad = quad.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &b in &quad[..4 - pad] {
            n = n << 6 | u32::from(sextet(b)?);
        }
        n <<= 6 * pad as u32;
        let got = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        let keep = 3 - pad;
        if got[keep..].iter().any(|&b| b != 0) {
            return None;
        }
        out.extend_from_slice(&got[..keep]);
    }
    Some(out)
}

fn sextet(b: u8) -> Option<u8> {
    Some(match b {
        b'A'..=b'Z' => b - b'A',
        b'a'..=b'z' => b - b'a' + 26,
        b'0'..=b'9' => b - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hash_round_trip() {
        let stored = hash_password(b"salt", "secret");
        assert!(stored.starts_with("sha256:73616c74:"));
        assert!(verify_password(&stored, "secret"));
        assert!(!verify_password(&stored, "Secret"));
        assert!(!verify_password("sha256:zz:00", "secret"));
        assert!(!verify_password("md5:00:00", "secret"));
        assert!(!verify_password("", ""));
    }

    #[test]
    fn base64_known_values() {
        assert_eq!(base64_encode(b"Username:"), "VXNlcm5hbWU6");
        assert_eq!(base64_encode(b"\0user\0pass"), "AHVzZXIAcGFzcw==");
        assert_eq!(base64_decode("AHVzZXIAcGFzcw==").unwrap(), b"\0user\0pass");
        assert_eq!(base64_decode("").unwrap(), b"");
        for bad in ["A", "AB=C", "A===", "AB==AB==", "AB C", "QQ=="[..3].as_ref(), "QR=="] {
            assert!(base64_decode(bad).is_none(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn base64_round_trip(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            prop_assert_eq!(base64_decode(&base64_encode(&data)), Some(data));
        }

        #[test]
        fn base64_decode_never_panics(text in ".{0,40}") {
            let _ = base64_decode(&text);
        }
    }
}
