//! Dot-stuffing of the message for `DATA` (RFC 5321 §4.5.2).
//!
//! After the 354 the message is sent as lines, ending with a line holding a single `.`, so
//! every line that starts with `.` gets a second one. Line ends are normalised to CRLF on the
//! way: RFC 5321 §2.3.8 forbids a bare CR or LF in SMTP, and receivers disagree about what
//! they mean. That disagreement is SMTP smuggling (CVE-2023-51764/51765/51766): a message
//! holding `<LF>.<LF>` could end the transaction early at some receivers and start a forged
//! one. After normalisation the only end-of-data sequence the relay ever emits is its own.
//!
//! Lines longer than RFC 5321 §4.5.3.1.6 allows (998 octets before the CRLF) are broken by
//! inserting CRLF and a space, as Postfix does at `smtp_line_length_limit`: receivers may
//! truncate or refuse longer lines, and a continuation that starts with a space can never be
//! taken for a new header field, a MIME boundary, a stuffed dot or the end of the data. In a
//! header the break is a folding (the field's value gains a space); in a body the line gains a
//! line break and a space. A line that long is not valid in any MIME encoding, so this only
//! touches mail that was already broken.
//!
//! The encoder keeps a little state so that chunk boundaries never change the output: a line
//! start or a CR may be the last byte of one chunk and decide what the next chunk's first
//! byte becomes, and the current line's length carries over.

/// Longest line the encoder emits, in octets before the CRLF and not counting a stuffed dot
/// (RFC 5321 §4.5.3.1.6: "The maximum total length of a text line including the <CRLF> is
/// 1000 octets (not counting the leading dot duplicated for transparency)").
pub const MAX_LINE_OCTETS: usize = 998;

/// Sans-IO dot-stuffer: feed it the message in chunks, then [`finish`](Self::finish) it.
#[derive(Clone, Debug)]
pub struct DotStuffer {
    /// The next byte starts a line (true at the start of the message).
    at_line_start: bool,
    /// The previous byte was a CR that has not been written yet, because whether it is a line
    /// end or a bare CR depends on the next byte.
    pending_cr: bool,
    /// Octets on the current output line, the stuffed dot not counted.
    line_len: usize,
    /// Longest line before a break is inserted.
    max_line: usize,
}

impl DotStuffer {
    /// An encoder at the start of a message, breaking lines longer than [`MAX_LINE_OCTETS`].
    pub fn new() -> Self {
        Self::with_line_limit(MAX_LINE_OCTETS)
    }

    /// An encoder that breaks lines longer than `max_line` octets (at least 2, so a broken
    /// line always makes progress). For tests and for next hops with their own limit.
    pub fn with_line_limit(max_line: usize) -> Self {
        Self { at_line_start: true, pending_cr: false, line_len: 0, max_line: max_line.max(2) }
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
                    if self.line_len >= self.max_line {
                        // The continuation starts with a space: never a dot to stuff.
                        out.extend_from_slice(b"\r\n ");
                        self.line_len = 1;
                    } else if self.at_line_start && byte == b'.' {
                        out.push(b'.');
                    }
                    out.push(byte);
                    self.at_line_start = false;
                    self.line_len += 1;
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
        self.line_len = 0;
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
    fn long_lines_are_broken_with_crlf_space() {
        let line = |n: usize| vec![b'a'; n];
        // 998 octets pass untouched; 999 get a break before the last one.
        assert_eq!(
            stuff(&[line(998), b"\r\n".to_vec()].concat()),
            [line(998), b"\r\n.\r\n".to_vec()].concat()
        );
        assert_eq!(stuff(&line(999)), [line(998), b"\r\n a\r\n.\r\n".to_vec()].concat());
        // A stuffed dot does not count; a dot after the break needs no stuffing.
        let dotted = [b".".to_vec(), line(997), b".x".to_vec()].concat();
        assert_eq!(
            stuff(&dotted),
            [b"..".to_vec(), line(997), b"\r\n .x\r\n.\r\n".to_vec()].concat()
        );
        // Every line of a 5000-octet one stays within the limit.
        let wire = stuff(&line(5000));
        assert!(wire.split(|&b| b == b'\n').all(|l| l.len() <= MAX_LINE_OCTETS + 1));
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

        /// With a small limit: no emitted line is longer than the limit, and taking out the
        /// inserted breaks gives back the normalised message (no spaces in the input, so every
        /// CRLF SP on the wire is one of ours).
        #[test]
        fn broken_lines_round_trip(
            message in prop::collection::vec(
                prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a')], 0..200),
            limit in 2usize..12,
            mut cuts in prop::collection::vec(0usize..200, 0..6),
        ) {
            cuts.sort_unstable();
            let mut wire = Vec::new();
            let mut stuffer = DotStuffer::with_line_limit(limit);
            let mut start = 0;
            for &cut in &cuts {
                let cut = cut.clamp(start, message.len());
                stuffer.encode(&message[start..cut], &mut wire);
                start = cut;
            }
            stuffer.encode(&message[start..], &mut wire);
            stuffer.finish(&mut wire);
            for line in wire.split(|&b| b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let counted = if line.starts_with(b"..") { line.len() - 1 } else { line.len() };
                prop_assert!(counted <= limit, "{:?}", String::from_utf8_lossy(line));
            }
            let (body, rest) = unstuff(&wire);
            prop_assert!(rest.is_empty());
            let mut joined = Vec::new();
            let mut i = 0;
            while i < body.len() {
                if body[i..].starts_with(b"\r\n ") {
                    i += 3;
                } else {
                    joined.push(body[i]);
                    i += 1;
                }
            }
            prop_assert_eq!(joined, normalised(&message));
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
