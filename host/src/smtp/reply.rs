//! SMTP reply parsing (RFC 5321 §4.2), fed bytes incrementally.
//!
//! The parser is a byte-at-a-time state machine so that a reply split over many TCP segments
//! and a reply delivered in one segment are judged by exactly the same code path; the only
//! difference is how often the caller asks. Every limit is checked on the byte that would break
//! it, so a hostile server can make the relay hold at most `max_reply_len` bytes of one reply
//! and can never make it rescan what it already read (a drip-fed reply costs linear time).
//!
//! The parser never decides what a reply *means*: it returns a [`Reply`] whose [`Severity`]
//! comes from the first digit, and leaves classification to the layer above.
//!
//! [`ReplyBuffer`] owns the received bytes and reports how many are left over after a reply.
//! That count is what the STARTTLS response-injection check needs: any byte buffered after the
//! `220` to `STARTTLS` was sent in plaintext before the handshake and must never be read as a
//! reply once TLS is up (CVE-2021-38371, CVE-2020-14954).

use std::fmt;

/// Default longest reply line, including the CRLF.
///
/// RFC 5321 §4.5.3.1.5 sets 512 octets, but real servers send longer lines (long EHLO lists,
/// verbose rejections), so the default tolerates four times that before calling it hostile.
pub const DEFAULT_MAX_LINE_LEN: usize = 2048;

/// Default largest complete reply, in bytes including every CRLF.
pub const DEFAULT_MAX_REPLY_LEN: usize = 64 * 1024;

/// Default most lines in one multi-line reply.
pub const DEFAULT_MAX_LINES: usize = 256;

/// The shortest possible reply line, `"250\r\n"`; limits are never set below it.
const MIN_LINE_LEN: usize = 5;

/// Incremental parser for one SMTP reply at a time.
///
/// `parse` remembers how far it has scanned, so feeding a growing buffer costs linear time in
/// total. Its contract is that each call passes the bytes of the previous call (starting at the
/// first unconsumed byte) with new bytes appended; after it returns a reply or an error, the
/// next call starts a fresh reply. If the caller breaks that contract it must call
/// [`ReplyParser::reset`]. [`ReplyBuffer`] keeps the contract for you.
#[derive(Clone, Debug)]
pub struct ReplyParser {
    max_line_len: usize,
    max_reply_len: usize,
    max_lines: usize,
    scan: Scan,
}

impl ReplyParser {
    /// A parser with the default limits ([`DEFAULT_MAX_LINE_LEN`], [`DEFAULT_MAX_REPLY_LEN`],
    /// [`DEFAULT_MAX_LINES`]).
    pub fn new() -> Self {
        Self {
            max_line_len: DEFAULT_MAX_LINE_LEN,
            max_reply_len: DEFAULT_MAX_REPLY_LEN,
            max_lines: DEFAULT_MAX_LINES,
            scan: Scan::default(),
        }
    }

    /// Sets the longest accepted line, CRLF included; raised to 5 (`"250\r\n"`) if lower.
    pub fn with_max_line_len(mut self, max: usize) -> Self {
        self.max_line_len = max.max(MIN_LINE_LEN);
        self
    }

    /// Sets the largest accepted reply in bytes; raised to 5 (`"250\r\n"`) if lower.
    pub fn with_max_reply_len(mut self, max: usize) -> Self {
        self.max_reply_len = max.max(MIN_LINE_LEN);
        self
    }

    /// Sets the most lines one reply may have; raised to 1 if lower.
    pub fn with_max_lines(mut self, max: usize) -> Self {
        self.max_lines = max.max(1);
        self
    }

    /// The longest accepted line, CRLF included.
    pub fn max_line_len(&self) -> usize {
        self.max_line_len
    }

    /// The largest accepted reply in bytes.
    pub fn max_reply_len(&self) -> usize {
        self.max_reply_len
    }

    /// The most lines one reply may have.
    pub fn max_lines(&self) -> usize {
        self.max_lines
    }

    /// Parses the reply at the start of `buf`.
    ///
    /// Returns the reply and the number of bytes it occupied once its final line (including
    /// the CRLF) is present, and `None` while more bytes are needed. Bytes after the reply are
    /// not examined: the caller compares the consumed count with `buf.len()` to learn whether
    /// anything else was sent, which is how pipelined replies and STARTTLS response injection
    /// are told apart from a lone reply.
    ///
    /// Lines must end in CRLF; a bare LF is an error rather than being tolerated, because an
    /// SMTP peer that cannot frame its replies cannot be trusted to frame anything else (and a
    /// lenient reader is how smuggling bugs start). Reply text need not be UTF-8: invalid
    /// sequences are replaced, since servers send NUL and 8-bit bytes and they are harmless in
    /// text. Error offsets count from the start of `buf`.
    ///
    /// An error leaves the parser reset; the stream is desynchronised and the connection
    /// should be dropped.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        if buf.len() < self.scan.pos {
            self.reset();
        }
        let result = self.scan_from(buf);
        if !matches!(result, Ok(None)) {
            self.reset();
        }
        result
    }

    /// Forgets any partly scanned reply, so the next [`parse`](Self::parse) starts afresh.
    pub fn reset(&mut self) {
        self.scan = Scan::default();
    }

    fn scan_from(&mut self, buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        while let Some(&byte) = buf.get(self.scan.pos) {
            let pos = self.scan.pos;
            let col = pos - self.scan.line_start;
            if byte == b'\n' {
                if col == 0 || buf[pos - 1] != b'\r' {
                    return Err(ReplyError::BareLf { offset: pos });
                }
                if let Some(reply) = self.end_line(buf, pos)? {
                    return Ok(Some((reply, pos + 1)));
                }
            } else {
                self.check_room(pos, col)?;
                self.header_byte(byte, pos, col)?;
            }
            self.scan.pos += 1;
        }
        Ok(None)
    }

    /// Enforces the limits on a byte that does not end the reply: at least one more byte (the
    /// LF) must follow it, so a line or reply already at its limit can never become valid.
    fn check_room(&self, pos: usize, col: usize) -> Result<(), ReplyError> {
        if col + 2 > self.max_line_len {
            return Err(ReplyError::LineTooLong {
                offset: self.scan.line_start,
                max: self.max_line_len,
            });
        }
        if pos + 2 > self.max_reply_len {
            return Err(ReplyError::ReplyTooLarge { offset: pos, max: self.max_reply_len });
        }
        Ok(())
    }

    /// Validates the code and separator in the first four bytes of a line (and the LF that
    /// must follow a CR in the separator position); text bytes need no check.
    fn header_byte(&mut self, byte: u8, pos: usize, col: usize) -> Result<(), ReplyError> {
        let scan = &mut self.scan;
        match col {
            0..=2 => {
                if !byte.is_ascii_digit() {
                    return Err(ReplyError::NonDigitCode { offset: pos, byte });
                }
                scan.line_code = scan.line_code * 10 + u16::from(byte - b'0');
                if col == 2 {
                    let code = scan.line_code;
                    if !(2..=5).contains(&(code / 100)) {
                        return Err(ReplyError::CodeOutOfRange { offset: scan.line_start, code });
                    }
                    match scan.code {
                        None => scan.code = Some(code),
                        Some(expected) if expected != code => {
                            return Err(ReplyError::MixedCodes {
                                offset: scan.line_start,
                                expected,
                                found: code,
                            });
                        }
                        Some(_) => {}
                    }
                }
            }
            3 => match byte {
                b' ' => scan.last_line = true,
                b'\r' => {
                    scan.last_line = true;
                    scan.cr_separator = true;
                }
                b'-' => {
                    if scan.lines.len() + 1 >= self.max_lines {
                        return Err(ReplyError::TooManyLines {
                            offset: scan.line_start,
                            max: self.max_lines,
                        });
                    }
                }
                _ => return Err(ReplyError::BadSeparator { offset: pos, byte }),
            },
            // Only a LF may follow a CR separator, and LFs never reach this function.
            4 if scan.cr_separator => {
                return Err(ReplyError::BadSeparator { offset: pos - 1, byte: b'\r' });
            }
            _ => {}
        }
        Ok(())
    }

    /// Finishes the line whose LF is at `pos`; returns the reply if that was the last line.
    fn end_line(&mut self, buf: &[u8], pos: usize) -> Result<Option<Reply>, ReplyError> {
        let start = self.scan.line_start;
        let text_start = (start + 4).min(pos - 1);
        let text = String::from_utf8_lossy(&buf[text_start..pos - 1]).into_owned();
        self.scan.lines.push(text);
        if self.scan.last_line {
            // Always set: a LF is only reached here after a complete, validated code.
            let code = self.scan.code.unwrap_or_default();
            let lines = std::mem::take(&mut self.scan.lines);
            return Ok(Some(Reply::from_parts(code, lines)));
        }
        if pos + 2 > self.max_reply_len {
            return Err(ReplyError::ReplyTooLarge { offset: pos, max: self.max_reply_len });
        }
        self.scan.line_start = pos + 1;
        self.scan.line_code = 0;
        self.scan.cr_separator = false;
        Ok(None)
    }
}

impl Default for ReplyParser {
    fn default() -> Self {
        Self::new()
    }
}

/// How far [`ReplyParser`] got through a reply that is not yet complete.
#[derive(Clone, Debug, Default)]
struct Scan {
    /// Next byte to examine, counted from the start of the reply.
    pos: usize,
    line_start: usize,
    /// The code of the current line, accumulated digit by digit.
    line_code: u16,
    /// The code of the first line, which every later line must repeat.
    code: Option<u16>,
    /// The current line has a space or CR separator, so it ends the reply.
    last_line: bool,
    /// The current line's separator was a CR, as in `"250\r\n"`.
    cr_separator: bool,
    lines: Vec<String>,
}

/// A complete SMTP reply: one code and one or more lines of text.
///
/// The fields are private because the rest of the relay relies on two invariants the parser
/// establishes: the code is a valid RFC 5321 code (first digit 2 to 5, second 0 to 5) and there
/// is at least one line.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Reply {
    code: u16,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl Reply {
    fn from_parts(code: u16, lines: Vec<String>) -> Self {
        let enhanced = lines
            .first()
            .and_then(|first| EnhancedCode::parse_prefix(first))
            .filter(|enhanced| u16::from(enhanced.class) == code / 100);
        Self { code, enhanced, lines }
    }

    /// The three-digit reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The RFC 3463 enhanced status code at the start of the first line, if there is one.
    ///
    /// It is only taken when its class matches the reply's first digit (as Postfix does): a
    /// `250` whose text starts `5.1.1` is prose or a broken server, not a permanent failure.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The text of each line, without code, separator or CRLF (and with the enhanced code
    /// left in place, so nothing the server said is lost).
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// The class of the reply, from its first digit; the only part of an unknown code a client
    /// may act on (RFC 5321 §4.3.2).
    pub fn severity(&self) -> Severity {
        match self.code / 100 {
            2 => Severity::PositiveCompletion,
            3 => Severity::PositiveIntermediate,
            4 => Severity::TransientNegative,
            // The parser only builds codes whose first digit is 2 to 5.
            _ => Severity::PermanentNegative,
        }
    }

    /// Whether the reply is 2xx or 3xx, that is, the command was accepted or may continue.
    pub fn is_positive(&self) -> bool {
        matches!(self.severity(), Severity::PositiveCompletion | Severity::PositiveIntermediate)
    }

    /// All lines' text joined with `'\n'`, for diagnostics and bounce messages.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Writes the reply in wire form, CRLFs included.
///
/// A final line with empty text is written as `"250\r\n"`, so `"250 \r\n"` does not
/// round-trip byte for byte. Text is written as received (after lossy UTF-8 decoding); log it
/// with `{:?}` when it may hold control characters.
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            match (i == last, line.is_empty()) {
                (true, true) => write!(f, "{}\r\n", self.code)?,
                (true, false) => write!(f, "{} {line}\r\n", self.code)?,
                (false, _) => write!(f, "{}-{line}\r\n", self.code)?,
            }
        }
        Ok(())
    }
}

/// The class of a reply, from the first digit of its code (RFC 5321 §4.2.1).
///
/// There is no "positive preliminary" (1xx) class: SMTP never uses it and the parser rejects it.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Severity {
    /// 2xx: the command succeeded.
    PositiveCompletion,
    /// 3xx: the command was accepted and more input is expected (the 354 to `DATA`).
    PositiveIntermediate,
    /// 4xx: a temporary failure; the same command may succeed later.
    TransientNegative,
    /// 5xx: a permanent failure; repeating the command will not help.
    PermanentNegative,
}

/// An RFC 3463 enhanced status code such as `4.7.5`, as sent under RFC 2034.
///
/// The fields are public because this is a plain value that policies match on (for example
/// `5.7.30` for REQUIRETLS), and no invariant elsewhere depends on it.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct EnhancedCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    /// The subject, 0 to 999 (for example 7 for security or policy status).
    pub subject: u16,
    /// The detail within the subject, 0 to 999.
    pub detail: u16,
}

impl EnhancedCode {
    /// Parses `class.subject.detail` at the start of `text` when it is followed by a space or
    /// the end of the text; anything else (such as `5.1.1x` or `2.0`) is not a code.
    fn parse_prefix(text: &str) -> Option<Self> {
        let token = text.split(' ').next()?;
        let mut parts = token.split('.');
        let class = match parts.next()? {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        let subject = number_1_to_3_digits(parts.next()?)?;
        let detail = number_1_to_3_digits(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self { class, subject, detail })
    }
}

/// Writes the code as `class.subject.detail`, for example `4.7.5`.
impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

fn number_1_to_3_digits(s: &str) -> Option<u16> {
    if (1..=3).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().ok()
    } else {
        None
    }
}

/// A bounded buffer of received bytes that yields replies one at a time.
///
/// It exists so that the connection layer never keeps bytes in a place it cannot see: after
/// reading the reply to `STARTTLS`, [`pending`](Self::pending) must be zero, or the peer (or a
/// man in the middle) sent bytes that would otherwise be taken for replies over TLS.
#[derive(Clone, Debug, Default)]
pub struct ReplyBuffer {
    buf: Vec<u8>,
    parser: ReplyParser,
}

impl ReplyBuffer {
    /// An empty buffer using a parser with the default limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer using `parser`'s limits; its buffer limit is the parser's
    /// [`max_reply_len`](ReplyParser::max_reply_len).
    pub fn with_parser(mut parser: ReplyParser) -> Self {
        parser.reset();
        Self { buf: Vec::new(), parser }
    }

    /// Appends received bytes.
    ///
    /// Fails, appending nothing, if the buffer would hold more than the parser's
    /// `max_reply_len` bytes. Callers should drain [`next_reply`](Self::next_reply) until it
    /// returns `None` and read at most [`room`](Self::room) bytes before extending again; done
    /// that way this never fails, because an incomplete reply always leaves at least one byte of
    /// room (a reply that could not fit is rejected by the parser first).
    pub fn extend(&mut self, bytes: &[u8]) -> Result<(), ReplyError> {
        let limit = self.parser.max_reply_len();
        if bytes.len() > limit - self.buf.len().min(limit) {
            return Err(ReplyError::BufferFull {
                pending: self.buf.len(),
                incoming: bytes.len(),
                max: limit,
            });
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Removes and returns the next complete reply, or `None` if more bytes are needed.
    ///
    /// On error the offending bytes stay buffered (asking again gives the same error); the
    /// connection should be dropped.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, ReplyError> {
        match self.parser.parse(&self.buf)? {
            Some((reply, consumed)) => {
                self.buf.drain(..consumed);
                Ok(Some(reply))
            }
            None => Ok(None),
        }
    }

    /// How many received bytes have not been returned as part of a reply.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// How many more bytes [`extend`](Self::extend) will accept now.
    pub fn room(&self) -> usize {
        self.parser.max_reply_len().saturating_sub(self.buf.len())
    }

    /// Discards every buffered byte and any partly parsed reply.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.parser.reset();
    }
}

/// Why bytes from the server are not a valid SMTP reply.
///
/// Every variant means the session is desynchronised; none is retried on the same connection.
/// Offsets count bytes from the start of the reply being parsed.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplyError {
    /// A byte in the three code positions was not an ASCII digit (`abc`, `22\r\n`).
    #[error("reply code has non-digit byte {byte:#04x} at offset {offset}")]
    NonDigitCode {
        /// Offset of the offending byte.
        offset: usize,
        /// The offending byte.
        byte: u8,
    },
    /// The code's first digit was not 2 to 5. Other digits are not judged: RFC 5321 §4.2.1 has
    /// clients act on the first digit, and real servers send codes such as 299 (PARSE-06).
    #[error("reply code {code} at offset {offset} is out of range")]
    CodeOutOfRange {
        /// Offset of the start of the line.
        offset: usize,
        /// The code as read.
        code: u16,
    },
    /// The byte after the code was not a space, `-` or CRLF (`2200`, `250x`).
    #[error("reply has bad separator byte {byte:#04x} at offset {offset}")]
    BadSeparator {
        /// Offset of the offending byte.
        offset: usize,
        /// The offending byte.
        byte: u8,
    },
    /// A line ended in LF without a CR before it.
    #[error("reply has a bare LF at offset {offset}")]
    BareLf {
        /// Offset of the LF.
        offset: usize,
    },
    /// A line was longer than the limit, CRLF included.
    #[error("reply line at offset {offset} is longer than {max} bytes")]
    LineTooLong {
        /// Offset of the start of the line.
        offset: usize,
        /// The limit in force.
        max: usize,
    },
    /// A multi-line reply had more lines than the limit.
    #[error("reply has more than {max} lines (continuation at offset {offset})")]
    TooManyLines {
        /// Offset of the line that announced one line too many.
        offset: usize,
        /// The limit in force.
        max: usize,
    },
    /// The reply was larger than the limit.
    #[error("reply is larger than {max} bytes (at offset {offset})")]
    ReplyTooLarge {
        /// Offset of the first byte beyond what the limit allows.
        offset: usize,
        /// The limit in force.
        max: usize,
    },
    /// A line of a multi-line reply carried a different code from the first line.
    #[error("reply line at offset {offset} has code {found}, expected {expected}")]
    MixedCodes {
        /// Offset of the start of the line.
        offset: usize,
        /// The first line's code.
        expected: u16,
        /// This line's code.
        found: u16,
    },
    /// [`ReplyBuffer::extend`] would have held more than the limit.
    #[error("reply buffer full: {pending} bytes pending, {incoming} incoming, limit {max}")]
    BufferFull {
        /// Bytes already buffered.
        pending: usize,
        /// Bytes offered.
        incoming: usize,
        /// The limit in force.
        max: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(input: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
        ReplyParser::new().parse(input)
    }

    fn parse_bytewise(
        parser: &mut ReplyParser,
        input: &[u8],
    ) -> Result<Option<(Reply, usize)>, ReplyError> {
        for end in 0..=input.len() {
            if let Some(done) = parser.parse(&input[..end])? {
                return Ok(Some(done));
            }
        }
        Ok(None)
    }

    fn reply(input: &str) -> Reply {
        let (reply, consumed) =
            parse_all(input.as_bytes()).expect("valid reply").expect("complete reply");
        assert_eq!(consumed, input.len());
        reply
    }

    #[test]
    fn valid_replies() {
        let cases: &[(&str, u16, &[&str])] = &[
            ("250 OK\r\n", 250, &["OK"]),
            ("250\r\n", 250, &[""]),
            ("250 \r\n", 250, &[""]),
            ("250-\r\n250 OK\r\n", 250, &["", "OK"]),
            ("220-mx.example ESMTP\r\n220 ready\r\n", 220, &["mx.example ESMTP", "ready"]),
            ("251 forwarded\r\n", 251, &["forwarded"]),
            ("255 odd\r\n", 255, &["odd"]),
            ("354 go ahead\r\n", 354, &["go ahead"]),
            ("455 busy\r\n", 455, &["busy"]),
            ("559 no\r\n", 559, &["no"]),
            ("250-a\r\n250-b\r\n250\r\n", 250, &["a", "b", ""]),
            ("250 a\rb\r\n", 250, &["a\rb"]),
            ("250 x\0y\r\n", 250, &["x\0y"]),
            ("250 caf\u{e9}\r\n", 250, &["caf\u{e9}"]),
        ];
        for &(input, code, lines) in cases {
            let r = reply(input);
            assert_eq!(r.code(), code, "{input:?}");
            assert_eq!(r.lines(), lines, "{input:?}");
        }
    }

    #[test]
    fn invalid_utf8_is_kept_lossily() {
        let (r, _) = parse_all(b"250 a\xffb\r\n").unwrap().unwrap();
        assert_eq!(r.lines(), ["a\u{fffd}b"]);
    }

    #[test]
    fn incomplete_replies_need_more_bytes() {
        for input in
            [&b""[..], b"2", b"250", b"250 OK", b"250 OK\r", b"250-a\r\n", b"250-a\r\n250 b"]
        {
            assert_eq!(parse_all(input), Ok(None), "{input:?}");
        }
    }

    #[test]
    fn each_error_variant() {
        use ReplyError::*;
        #[rustfmt::skip]
        let cases: &[(&[u8], ReplyError)] = &[
            (b"abc\r\n", NonDigitCode { offset: 0, byte: b'a' }),
            (b"22\r\n", NonDigitCode { offset: 2, byte: b'\r' }),
            (b"\r\n", NonDigitCode { offset: 0, byte: b'\r' }),
            (b"099 x\r\n", CodeOutOfRange { offset: 0, code: 99 }),
            (b"650 x\r\n", CodeOutOfRange { offset: 0, code: 650 }),
            (b"160 x\r\n", CodeOutOfRange { offset: 0, code: 160 }),
            (b"2200 x\r\n", BadSeparator { offset: 3, byte: b'0' }),
            (b"250x\r\n", BadSeparator { offset: 3, byte: b'x' }),
            (b"250\rx\r\n", BadSeparator { offset: 3, byte: b'\r' }),
            (b"250 OK\n", BareLf { offset: 6 }),
            (b"\n", BareLf { offset: 0 }),
            (b"250-a\r\n250 b\n", BareLf { offset: 12 }),
            (b"250-a\r\n251 b\r\n", MixedCodes { offset: 7, expected: 250, found: 251 }),
            (b"250-mx\r\n500 x\r\n", MixedCodes { offset: 8, expected: 250, found: 500 }),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_all(input).as_ref(), Err(expected), "{input:?}");
        }
    }

    #[test]
    fn line_too_long() {
        let mut parser = ReplyParser::new().with_max_line_len(10);
        assert!(parser.parse(b"250 abcd\r\n").unwrap().is_some());
        assert_eq!(
            parser.parse(b"250 abcde\r\n"),
            Err(ReplyError::LineTooLong { offset: 0, max: 10 })
        );
        // Detected without waiting for an end of line that may never come.
        assert_eq!(
            parser.parse(b"250-a\r\n250 abcdefghijklmnop"),
            Err(ReplyError::LineTooLong { offset: 7, max: 10 })
        );
        assert_eq!(parser.parse(b"250 abcde"), Ok(None));
        assert_eq!(
            parser.parse(b"250 abcdef"),
            Err(ReplyError::LineTooLong { offset: 0, max: 10 })
        );
    }

    #[test]
    fn reply_too_large() {
        let mut parser = ReplyParser::new().with_max_reply_len(16);
        assert!(parser.parse(b"250-ab\r\n250 cd\r\n").unwrap().is_some());
        assert_eq!(
            parser.parse(b"250-ab\r\n250 cde\r\n"),
            Err(ReplyError::ReplyTooLarge { offset: 15, max: 16 })
        );
        // A continuation line ending exactly at the limit can never be followed by a last line.
        assert_eq!(
            parser.parse(b"250-abcdefghij\r\n"),
            Err(ReplyError::ReplyTooLarge { offset: 15, max: 16 })
        );
    }

    #[test]
    fn too_many_lines() {
        let mut parser = ReplyParser::new().with_max_lines(3);
        assert!(parser.parse(b"250-a\r\n250-b\r\n250 c\r\n").unwrap().is_some());
        assert_eq!(
            parser.parse(b"250-a\r\n250-b\r\n250-c\r\n250 d\r\n"),
            Err(ReplyError::TooManyLines { offset: 14, max: 3 })
        );
    }

    #[test]
    fn limits_are_clamped() {
        let parser =
            ReplyParser::new().with_max_line_len(0).with_max_reply_len(1).with_max_lines(0);
        assert_eq!(parser.max_line_len(), 5);
        assert_eq!(parser.max_reply_len(), 5);
        assert_eq!(parser.max_lines(), 1);
        let mut parser = parser;
        assert!(parser.parse(b"250\r\n").unwrap().is_some());
    }

    #[test]
    fn bytewise_feeding_matches_whole() {
        let inputs: &[&[u8]] = &[
            b"250 OK\r\n",
            b"250-a\r\n250-b\r\n250 c\r\nextra",
            b"220-x\r\n220 y\r\n250 z\r\n",
            b"250-a\r\n251 b\r\n",
            b"250 OK\n",
            b"2200\r\n",
            b"250\rx",
        ];
        for input in inputs {
            let mut parser = ReplyParser::new();
            assert_eq!(parse_bytewise(&mut parser, input), parse_all(input), "{input:?}");
        }
    }

    #[test]
    fn consumed_stops_at_the_end_of_the_reply() {
        let input = b"220 2.0.0 Ready to start TLS\r\n250-INJECTED.example\r\n250 AUTH PLAIN\r\n";
        let (r, consumed) = parse_all(input).unwrap().unwrap();
        assert_eq!(r.code(), 220);
        assert_eq!(consumed, 30);
        assert!(consumed < input.len());
    }

    #[test]
    fn shorter_buffer_resets_the_parser() {
        let mut parser = ReplyParser::new();
        assert_eq!(parser.parse(b"250-a\r\n250"), Ok(None));
        let (r, _) = parser.parse(b"354 go\r\n").unwrap().unwrap();
        assert_eq!(r.code(), 354);
    }

    #[test]
    fn severity_and_positivity() {
        let cases = [
            ("250 ok\r\n", Severity::PositiveCompletion, true),
            ("354 go\r\n", Severity::PositiveIntermediate, true),
            ("451 later\r\n", Severity::TransientNegative, false),
            ("550 no\r\n", Severity::PermanentNegative, false),
        ];
        for (input, severity, positive) in cases {
            let r = reply(input);
            assert_eq!(r.severity(), severity);
            assert_eq!(r.is_positive(), positive);
        }
    }

    #[test]
    fn enhanced_codes() {
        let code = |class, subject, detail| EnhancedCode { class, subject, detail };
        let cases: &[(&str, Option<EnhancedCode>)] = &[
            ("250 2.0.0 OK\r\n", Some(code(2, 0, 0))),
            ("454 4.7.5 TLS unavailable\r\n", Some(code(4, 7, 5))),
            ("550 5.7.30 REQUIRETLS needed\r\n", Some(code(5, 7, 30))),
            ("550 5.999.999\r\n", Some(code(5, 999, 999))),
            ("550-5.1.1 first\r\n550 5.1.2 second\r\n", Some(code(5, 1, 1))),
            ("250 OK\r\n", None),
            ("250\r\n", None),
            ("250 2.0\r\n", None),
            ("250 2.0.0.0\r\n", None),
            ("250 2.0.0x\r\n", None),
            ("250 2.0.1000\r\n", None),
            ("250 2..0\r\n", None),
            ("250 3.0.0\r\n", None),
            ("250 5.1.1 class mismatch\r\n", None),
            ("354 2.0.0 go\r\n", None),
            ("250  2.0.0\r\n", None),
        ];
        for &(input, expected) in cases {
            assert_eq!(reply(input).enhanced(), expected, "{input:?}");
        }
        assert_eq!(code(4, 7, 5).to_string(), "4.7.5");
    }

    #[test]
    fn display_is_wire_form_and_text_joins_lines() {
        for input in
            ["250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n", "250\r\n", "250-\r\n250 x\r\n"]
        {
            assert_eq!(reply(input).to_string(), input);
        }
        assert_eq!(reply("250 \r\n").to_string(), "250\r\n");
        assert_eq!(reply("250-a\r\n250 b\r\n").text(), "a\nb");
    }

    #[test]
    fn buffer_yields_pipelined_replies_and_reports_leftovers() {
        let mut buf = ReplyBuffer::new();
        buf.extend(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n35").unwrap();
        assert_eq!(buf.next_reply().unwrap().unwrap().code(), 250);
        assert_eq!(buf.next_reply().unwrap().unwrap().code(), 250);
        assert_eq!(buf.next_reply(), Ok(None));
        assert_eq!(buf.pending(), 2);
        buf.extend(b"4 go\r\n").unwrap();
        assert_eq!(buf.next_reply().unwrap().unwrap().code(), 354);
        assert_eq!(buf.pending(), 0);
    }

    #[test]
    fn buffer_exposes_starttls_response_injection() {
        let mut buf = ReplyBuffer::new();
        buf.extend(b"220 Ready\r\n250-X-INJECTED\r\n250 AUTH PLAIN\r\n").unwrap();
        assert_eq!(buf.next_reply().unwrap().unwrap().code(), 220);
        assert_eq!(buf.pending(), 32);
        buf.clear();
        assert_eq!(buf.pending(), 0);
        assert_eq!(buf.next_reply(), Ok(None));
    }

    #[test]
    fn buffer_is_bounded() {
        let mut buf = ReplyBuffer::with_parser(ReplyParser::new().with_max_reply_len(10));
        assert_eq!(buf.room(), 10);
        buf.extend(b"250 ab").unwrap();
        assert_eq!(buf.room(), 4);
        assert_eq!(
            buf.extend(b"cdefg"),
            Err(ReplyError::BufferFull { pending: 6, incoming: 5, max: 10 })
        );
        assert_eq!(buf.pending(), 6);
        buf.extend(b"c\r\n").unwrap();
        assert_eq!(buf.next_reply().unwrap().unwrap().lines(), ["abc"]);
    }

    #[test]
    fn buffer_errors_are_sticky() {
        let mut buf = ReplyBuffer::new();
        buf.extend(b"250 OK\n").unwrap();
        assert_eq!(buf.next_reply(), Err(ReplyError::BareLf { offset: 6 }));
        assert_eq!(buf.next_reply(), Err(ReplyError::BareLf { offset: 6 }));
    }

    #[test]
    fn drip_fed_large_reply_is_scanned_once() {
        // Rescanning from the start on every byte would take billions of steps here.
        let mut input = Vec::new();
        for _ in 0..255 {
            input.extend_from_slice(b"250-");
            input.extend_from_slice(&[b'x'; 240]);
            input.extend_from_slice(b"\r\n");
        }
        input.extend_from_slice(b"250 end\r\n");
        let mut parser = ReplyParser::new();
        let (r, consumed) = parse_bytewise(&mut parser, &input).unwrap().unwrap();
        assert_eq!((r.lines().len(), consumed), (256, input.len()));
    }

    fn small_parser() -> ReplyParser {
        ReplyParser::new().with_max_line_len(40).with_max_reply_len(120).with_max_lines(4)
    }

    /// Bytes that are often close to valid replies, so the properties exercise deep states:
    /// mostly well-formed lines (sometimes with mixed codes or a wrong line end), with noise.
    fn replyish() -> impl Strategy<Value = Vec<u8>> {
        let line = (
            prop::sample::select(vec![
                "250", "250", "250", "250", "250", "250", "250", "220", "550", "25",
            ]),
            prop::sample::select(vec!["-", "-", "-", "-", "-", "-", " ", " ", "", "x"]),
            "[ -~]{0,12}",
            prop::sample::select(vec![
                "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\r\n", "\n", "\r", "",
            ]),
        )
            .prop_map(|(code, sep, text, end)| {
                let text = if sep.is_empty() { "" } else { text.as_str() };
                format!("{code}{sep}{text}{end}").into_bytes()
            });
        let piece = prop_oneof![
            12 => line,
            1 => prop::collection::vec(any::<u8>(), 0..6),
        ];
        prop::collection::vec(piece, 0..16).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        #[test]
        fn never_panics_and_respects_bounds(input in prop_oneof![
            replyish(),
            prop::collection::vec(any::<u8>(), 0..300),
        ]) {
            let mut parser = small_parser();
            match parser.parse(&input) {
                Ok(Some((reply, consumed))) => {
                    prop_assert!(consumed <= input.len());
                    prop_assert!(consumed <= 120);
                    prop_assert!(reply.lines().len() <= 4);
                    prop_assert!((200..600).contains(&reply.code()));
                }
                Ok(None) => prop_assert!(input.len() < 120),
                Err(_) => {}
            }
        }

        #[test]
        fn bytewise_equals_whole(input in replyish()) {
            let mut parser = small_parser();
            prop_assert_eq!(parse_bytewise(&mut parser, &input), small_parser().parse(&input));
        }

        #[test]
        fn buffer_chunking_is_invisible_and_never_stalls(
            input in replyish(),
            mut cuts in prop::collection::vec(0usize..400, 0..8),
        ) {
            // Reference: the parser applied to the whole input, reply after reply.
            let mut expected = Vec::new();
            let mut offset = 0;
            let expected_end = loop {
                match small_parser().parse(&input[offset..]) {
                    Ok(Some((reply, consumed))) => {
                        expected.push(reply);
                        offset += consumed;
                    }
                    Ok(None) => break Ok(input.len() - offset),
                    Err(e) => break Err(e),
                }
            };

            // The buffer, fed in arbitrary chunks of at most `room()` bytes, as a connection
            // would read them, and drained after each one.
            cuts.push(input.len());
            cuts.sort_unstable();
            let mut buf = ReplyBuffer::with_parser(small_parser());
            let mut replies = Vec::new();
            let mut start = 0;
            let end = 'feed: {
                for cut in cuts {
                    while start < cut.min(input.len()) {
                        prop_assert!(buf.room() > 0);
                        let stop = cut.min(input.len()).min(start + buf.room());
                        if let Err(e) = buf.extend(&input[start..stop]) {
                            break 'feed Err(e);
                        }
                        start = stop;
                        loop {
                            match buf.next_reply() {
                                Ok(Some(reply)) => replies.push(reply),
                                Ok(None) => break,
                                Err(e) => break 'feed Err(e),
                            }
                        }
                        prop_assert!(buf.pending() < 120);
                    }
                }
                Ok(buf.pending())
            };
            prop_assert_eq!(replies, expected);
            prop_assert_eq!(end, expected_end);
        }

        #[test]
        fn display_round_trips(lines in prop::collection::vec("[ -~]{0,20}", 1..4), code in 200u16..560) {
            prop_assume!(code / 10 % 10 <= 5);
            let last = lines.len() - 1;
            let mut wire = String::new();
            for (i, line) in lines.iter().enumerate() {
                let sep = if i == last { ' ' } else { '-' };
                wire.push_str(&format!("{code}{sep}{line}\r\n"));
            }
            let (r, consumed) = ReplyParser::new().parse(wire.as_bytes()).unwrap().unwrap();
            prop_assert_eq!(consumed, wire.len());
            prop_assert_eq!(r.lines(), &lines[..]);
            let again = ReplyParser::new().parse(r.to_string().as_bytes()).unwrap().unwrap().0;
            prop_assert_eq!(again, r);
        }
    }
}
