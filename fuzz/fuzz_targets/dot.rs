//! Dot-stuffing round trip: the outbound `DotStuffer` (in arbitrary chunks) against the inbound
//! `BodyDecoder` (in other chunks).
//!
//! Checks: the encoder's output holds CRLF line ends only, ends with the one end-of-data
//! marker and nowhere earlier, no line is longer than RFC 5321 allows; the decoder stops exactly
//! at its end; the decoded message is the input with its line ends normalised to CRLF, long
//! lines broken (and a final line end added).
#![no_main]

use libfuzzer_sys::fuzz_target;
use postwarden::inbound::BodyDecoder;
use postwarden::smtp::{DotStuffer, MAX_LINE_OCTETS};

/// The input with CRLF, bare CR and bare LF all turned into CRLF, lines longer than
/// `MAX_LINE_OCTETS` broken by CRLF and a space (as Postfix does), ending in a line end.
fn normalised(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = 0;
    let mut i = 0;
    while i < input.len() {
        match input[i] {
            b'\r' => {
                out.extend_from_slice(b"\r\n");
                line = 0;
                if input.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                line = 0;
            }
            b => {
                if line >= MAX_LINE_OCTETS {
                    out.extend_from_slice(b"\r\n ");
                    line = 1;
                }
                out.push(b);
                line += 1;
            }
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

fuzz_target!(|input: &[u8]| {
    let Some((&shape, message)) = input.split_first() else { return };
    let enc_chunk = usize::from(shape & 0x0f) + 1;
    let dec_chunk = usize::from(shape >> 4) + 1;

    let mut stuffer = DotStuffer::new();
    let mut wire = Vec::new();
    for chunk in message.chunks(enc_chunk) {
        stuffer.encode(chunk, &mut wire);
    }
    stuffer.finish(&mut wire);

    // No line longer than RFC 5321 allows (a stuffed dot not counted).
    for line in wire.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let dot = usize::from(line.starts_with(b"."));
        assert!(line.len() - dot <= MAX_LINE_OCTETS, "a line of {} octets", line.len());
    }
    // Only CRLF line ends, and the terminator appears once, at the very end.
    for (i, &b) in wire.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && wire[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(wire.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(&wire);
    let end = framed.windows(5).position(|w| w == b"\r\n.\r\n").expect("terminator");
    assert_eq!(end + 5, framed.len(), "end-of-data before the end");

    // The same decoded message from the whole wire and from chunks, with trailing bytes left.
    let mut decoder = BodyDecoder::new(usize::MAX);
    wire.extend_from_slice(b"NEXT");
    let mut used = 0;
    for chunk in wire.chunks(dec_chunk) {
        used += decoder.feed(chunk);
        if decoder.is_done() {
            break;
        }
    }
    assert!(decoder.is_done());
    assert_eq!(used, wire.len() - 4, "decoder stopped elsewhere than the terminator");
    let body = decoder.into_body().expect("no size limit");
    assert_eq!(body, normalised(message));
});
