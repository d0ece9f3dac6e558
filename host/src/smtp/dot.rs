//! Dot-stuffing of the message for `DATA` (RFC 5321 §4.5.2).
//!
//! After the 354 the message is sent as lines, ending with a line holding a single `.`, so
//! every line that starts with `.` gets a second one. Line ends are normalised to CRLF on the
//! way: RFC 5321 §2.3.8 forbids a bare CR or LF in SMTP, and receivers disagree about what
//! they mean. That disagreement is SMTP smuggling (CVE-2023-51764/51765/51766): a message
//! holding `<LF>.<LF>` could end the transaction early at some receivers and start a forged
//! one. After normalisation the only end-of-data sequence the relay ever emits is its own.
//!
//! The encoder keeps two bits of state so that chunk boundaries never change the output: a
//! line start or a CR may be the last byte of one chunk and decide what the next chunk's first
//! byte becomes.

/// Sans-IO dot-stuffer: feed it the message in chunks, then [`finish`](Self::finish) it.
#[derive(Clone, Debug)]
pub struct DotStuffer {
    /// The next byte starts a line (true at the start of the message).
    at_line_start: bool,
    /// The previous byte was a CR that has not been written yet, because whether it is a line
    /// end or a bare CR depends on the next byte.
    pending_cr: bool,
}

impl DotStuffer {
    /// An encoder at the start of a message.
    pub fn new() -> Self {
        Self { at_line_start: true, pending_cr: false }
    }

    /// Appends the stuffed, CRLF-normalised form of `chunk` to `out`.
    ///
    /// A CR at the end of `chunk` is held back until the next call or `finish`.
    pub fn encode(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        out.reserve(chunk.len() + chunk.len() / 16);
        for &byte in chunk {
            if self.pending_cr {
                self.pending_cr = false;
                self.end_line(out);
                if byte == b'\n' {
                    continue;
                }
            }
            match byte {
                b'\r' => self.pending_cr = true,
                b'\n' => self.end_line(out),
                _ => {
                    if self.at_line_start && byte == b'.' {
                        out.push(b'.');
                    }
                    out.push(byte);
                    self.at_line_start = false;
                }
            }
        }
    }

    /// Appends the end-of-data marker, consuming the encoder so nothing can follow it.
    ///
    /// A message that already ends in a line end gets `.\r\n`, completing `\r\n.\r\n`; one
    /// that does not gets `\r\n.\r\n`. An empty message gets `.\r\n`, which is correct because
    /// the 354 reply leaves the session at a line start.
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.at_line_start {
            self.end_line(out);
        }
        out.extend_from_slice(b".\r\n");
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        self.at_line_start = true;
    }
}

impl Default for DotStuffer {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stuff(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stuffer = DotStuffer::new();
        stuffer.encode(message, &mut out);
        stuffer.finish(&mut out);
        out
    }

    fn stuff_chunked(message: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stuffer = DotStuffer::new();
        let mut start = 0;
        for &cut in cuts {
            let cut = cut.clamp(start, message.len());
            stuffer.encode(&message[start..cut], &mut out);
            start = cut;
        }
        stuffer.encode(&message[start..], &mut out);
        stuffer.finish(&mut out);
        out
    }

    /// The receiving side, as RFC 5321 §4.5.2 describes it: read CRLF lines up to the lone
    /// `.`, dropping a leading dot from the rest. Returns the message and any bytes after the
    /// terminator; panics on a bare CR or LF, which the stuffer must never emit.
    fn unstuff(wire: &[u8]) -> (Vec<u8>, &[u8]) {
        let mut message = Vec::new();
        let mut rest = wire;
        loop {
            let end = rest.windows(2).position(|w| w == b"\r\n").expect("terminated");
            let line = &rest[..end];
            assert!(!line.contains(&b'\r') && !line.contains(&b'\n'), "bare CR or LF");
            rest = &rest[end + 2..];
            if line == b"." {
                return (message, rest);
            }
            message.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
            message.extend_from_slice(b"\r\n");
        }
    }

    /// What the message should look like after transport: CRLF line ends everywhere, and a
    /// final CRLF added if missing.
    fn normalised(message: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < message.len() {
            match message[i] {
                b'\r' if message.get(i + 1) == Some(&b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    i += 1;
                }
                b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
                byte => out.push(byte),
            }
            i += 1;
        }
        if !out.is_empty() && !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
            (b"a\n.\nb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r.\rb", b"a\r\n..\r\nb\r\n.\r\n"),
            (b"a\r", b"a\r\n.\r\n"),
            (b"\r\r\n", b"\r\n\r\n.\r\n"),
            (b"\n\r", b"\r\n\r\n.\r\n"),
            (b"x\r\n\r\n", b"x\r\n\r\n.\r\n"),
        ];
        for &(message, wire) in cases {
            assert_eq!(stuff(message), wire, "{:?}", String::from_utf8_lossy(message));
        }
    }

    #[test]
    fn smuggling_sequences_cannot_end_the_data() {
        let message = b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example>\r\n\r.\r\n";
        let wire = stuff(message);
        let (body, rest) = unstuff(&wire);
        assert!(rest.is_empty());
        assert_eq!(body, normalised(message));
        assert_eq!(wire.windows(5).filter(|w| w == b"\r\n.\r\n").count(), 1);
    }

    #[test]
    fn line_start_and_cr_split_across_chunks() {
        let message = b"a\r\n.b\r\r\n.";
        let whole = stuff(message);
        for cut in 0..=message.len() {
            assert_eq!(stuff_chunked(message, &[cut]), whole, "cut at {cut}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(message in prop::collection::vec(
            prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), any::<u8>()], 0..200)) {
            let wire = stuff(&message);
            let (body, rest) = unstuff(&wire);
            prop_assert!(rest.is_empty());
            prop_assert_eq!(body, normalised(&message));
        }

        #[test]
        fn chunking_does_not_change_the_output(
            message in prop::collection::vec(
                prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..100),
            mut cuts in prop::collection::vec(0usize..100, 0..10),
        ) {
            cuts.sort_unstable();
            prop_assert_eq!(stuff_chunked(&message, &cuts), stuff(&message));
        }
    }
}
