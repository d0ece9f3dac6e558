//! The `EHLO` reply of any server: each input line becomes one reply line (`250-...`), the
//! reply is parsed and its capabilities read.
//!
//! Checks: no panic; the capabilities do not depend on the reply's last-line marker; SASL
//! mechanisms are upper-case and unique; `size_limit` agrees with `size`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postwarden::smtp::{Capabilities, ReplyBuffer};

fuzz_target!(|data: &[u8]| {
    let lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let mut wire = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        wire.extend_from_slice(if i + 1 == lines.len() { b"250 " } else { b"250-" });
        wire.extend_from_slice(line);
        wire.extend_from_slice(b"\r\n");
    }
    let mut buf = ReplyBuffer::new();
    if buf.extend(&wire).is_err() {
        return;
    }
    let Ok(Some(reply)) = buf.next_reply() else { return };
    let caps = Capabilities::from_reply(&reply);
    let mut seen = std::collections::HashSet::new();
    for mech in &caps.auth {
        assert_eq!(mech, &mech.to_ascii_uppercase());
        assert!(seen.insert(mech.clone()), "duplicate mechanism {mech}");
    }
    assert_eq!(caps.size_limit(), caps.size.filter(|&s| s > 0));
    for other in &caps.other {
        // Trimmed of ASCII whitespace (RFC 5321 §2.4 speaks of ASCII only: VT is kept).
        assert_eq!(other.trim_matches(|c: char| c.is_ascii_whitespace()), other.as_str());
    }
});
