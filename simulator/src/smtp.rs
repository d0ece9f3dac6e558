//! The server side of the SMTP wire format, without I/O.
//!
//! Deliberately small and separate from the relay's own parser (STYLE.md rule 7): the fake
//! servers must not share a bug with the client they judge. [`Input`] buffers bytes and cuts
//! them into bounded lines (several pipelined commands may arrive in one read), [`Command`]
//! classifies a line, [`Body`] collects a DATA body up to the final dot, and [`reply`] formats
//! a well-formed reply (scenarios that need malformed ones write raw text instead).

use bytes::{Buf, BytesMut};

/// Longest command line accepted, CRLF included. RFC 5321 §4.5.3.1.4 says 512; we accept more
/// so that a relay's long but harmless line is judged by the scenario, not by this limit.
pub const MAX_COMMAND_LINE: usize = 4096;

/// Longest DATA line accepted, CRLF included (RFC 5321 §4.5.3.1.6 says 1000).
pub const MAX_TEXT_LINE: usize = 64 * 1024;

/// Largest message body kept track of; a bigger one is answered with 552.
pub const MAX_MESSAGE: usize = 32 * 1024 * 1024;

/// A line exceeded its length bound before its line feed arrived.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[error("line longer than {limit} octets")]
pub struct LineTooLong {
    /// The bound that was exceeded.
    pub limit: usize,
}

/// Bytes received and not yet consumed.
#[derive(Debug, Default)]
pub struct Input {
    buf: BytesMut,
}

impl Input {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The buffer to read into (for `AsyncReadExt::read_buf`).
    pub fn buffer_mut(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The buffered bytes, left in place.
    pub fn peek(&self) -> &[u8] {
        &self.buf
    }

    /// Removes and returns everything buffered.
    pub fn take_all(&mut self) -> Vec<u8> {
        self.buf.split().to_vec()
    }

    /// Whether the buffer starts like a TLS handshake record (a ClientHello where an SMTP
    /// command was expected).
    pub fn starts_like_tls(&self) -> bool {
        self.buf.first() == Some(&0x16)
    }

    /// Removes one line and returns it without its line ending.
    ///
    /// A line ends at LF; a CR before it is dropped too, so bare-LF clients are tolerated.
    /// `Ok(None)` means more bytes are needed.
    pub fn next_line(&mut self, limit: usize) -> Result<Option<Vec<u8>>, LineTooLong> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(end) if end < limit => {
                let mut line = self.buf.split_to(end + 1).to_vec();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Ok(Some(line))
            }
            Some(_) => Err(LineTooLong { limit }),
            None if self.buf.len() >= limit => Err(LineTooLong { limit }),
            None => Ok(None),
        }
    }

    /// Drops `n` bytes from the front.
    pub fn advance(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }
}

/// One SMTP command, classified by its verb (case-insensitive, RFC 5321 §2.4).
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Command {
    /// `EHLO <domain>`.
    Ehlo(String),
    /// `HELO <domain>`.
    Helo(String),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `MAIL FROM:<path> [params]`.
    Mail {
        /// The reverse path without angle brackets.
        from: String,
        /// ESMTP parameters, as sent.
        params: String,
    },
    /// `RCPT TO:<path> [params]`.
    Rcpt {
        /// The forward path without angle brackets.
        to: String,
        /// ESMTP parameters, as sent.
        params: String,
    },
    /// `DATA`.
    Data,
    /// `BDAT <size> [LAST]` (never advertised by the simulator).
    Bdat(String),
    /// `AUTH <mechanism> ...`.
    Auth(String),
    /// `RSET`.
    Rset,
    /// `NOOP`.
    Noop,
    /// `QUIT`.
    Quit,
    /// Anything else, with the verb upper-cased.
    Unknown(String),
}

impl Command {
    /// Classifies a command line (without its CRLF).
    pub fn parse(line: &[u8]) -> Self {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        let rest = rest.trim();
        match verb.to_ascii_uppercase().as_str() {
            "EHLO" => Self::Ehlo(rest.to_owned()),
            "HELO" => Self::Helo(rest.to_owned()),
            "STARTTLS" if rest.is_empty() => Self::StartTls,
            "MAIL" => match strip_prefix_ci(rest, "FROM:") {
                Some(arg) => {
                    let (from, params) = path_and_params(arg);
                    Self::Mail { from, params }
                }
                None => Self::Unknown("MAIL".to_owned()),
            },
            "RCPT" => match strip_prefix_ci(rest, "TO:") {
                Some(arg) => {
                    let (to, params) = path_and_params(arg);
                    Self::Rcpt { to, params }
                }
                None => Self::Unknown("RCPT".to_owned()),
            },
            "DATA" => Self::Data,
            "BDAT" => Self::Bdat(rest.to_owned()),
            "AUTH" => Self::Auth(rest.to_owned()),
            "RSET" => Self::Rset,
            "NOOP" => Self::Noop,
            "QUIT" => Self::Quit,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// Whether this command belongs to a mail transaction or authentication: what invariant I1
    /// forbids in plaintext under a forced decision.
    pub fn is_transaction(&self) -> bool {
        matches!(
            self,
            Self::Mail { .. } | Self::Rcpt { .. } | Self::Data | Self::Bdat(_) | Self::Auth(_)
        )
    }
}

/// Collects a DATA body (RFC 5321 §4.5.2 dot-stuffing) up to the final `.` line.
#[derive(Debug, Default)]
pub struct Body {
    size: usize,
    lines: usize,
    overflow: bool,
}

/// What [`Body::feed`] found.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum BodyProgress {
    /// More bytes are needed.
    More,
    /// The final dot was read; the body had this many octets (after un-stuffing, CRLFs counted).
    Done {
        /// Body size in octets.
        size: usize,
        /// Whether the body exceeded [`MAX_MESSAGE`].
        overflow: bool,
    },
}

impl Body {
    /// A new, empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many body lines have been read so far.
    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Consumes complete lines from `input`.
    pub fn feed(&mut self, input: &mut Input) -> Result<BodyProgress, LineTooLong> {
        while let Some(line) = input.next_line(MAX_TEXT_LINE)? {
            if line == b"." {
                return Ok(BodyProgress::Done { size: self.size, overflow: self.overflow });
            }
            let unstuffed = if line.first() == Some(&b'.') { &line[1..] } else { &line[..] };
            self.lines += 1;
            self.size = self.size.saturating_add(unstuffed.len() + 2);
            if self.size > MAX_MESSAGE {
                self.overflow = true;
            }
        }
        Ok(BodyProgress::More)
    }
}

/// Formats a well-formed reply: `code-text` lines, then `code text`.
pub fn reply(code: u16, lines: &[&str]) -> String {
    let mut out = String::new();
    let last = lines.len().saturating_sub(1);
    for (i, line) in lines.iter().enumerate() {
        let sep = if i == last { ' ' } else { '-' };
        out.push_str(&format!("{code}{sep}{line}\r\n"));
    }
    if lines.is_empty() {
        out.push_str(&format!("{code}\r\n"));
    }
    out
}

/// The local part of a path (`<Ok@x>` → `ok`), lower-cased, for per-recipient rules.
pub fn local_part(path: &str) -> String {
    let path = path.trim_matches(|c| c == '<' || c == '>');
    path.rsplit_once('@').map_or(path, |(local, _)| local).to_ascii_lowercase()
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| text[prefix.len()..].trim_start())
}

fn path_and_params(arg: &str) -> (String, String) {
    let (path, params) = arg.split_once(' ').unwrap_or((arg, ""));
    (path.trim_matches(|c| c == '<' || c == '>').to_owned(), params.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_commands_come_out_one_by_one() {
        let mut input = Input::new();
        input.extend(b"MAIL FROM:<a@x> SIZE=10\r\nRCPT TO:<B@y>\r\nDA");
        let first = input.next_line(MAX_COMMAND_LINE).unwrap().unwrap();
        assert_eq!(
            Command::parse(&first),
            Command::Mail { from: "a@x".into(), params: "SIZE=10".into() }
        );
        let second = input.next_line(MAX_COMMAND_LINE).unwrap().unwrap();
        assert_eq!(Command::parse(&second), Command::Rcpt { to: "B@y".into(), params: "".into() });
        assert_eq!(input.next_line(MAX_COMMAND_LINE).unwrap(), None);
        input.extend(b"TA\n");
        assert_eq!(
            Command::parse(&input.next_line(MAX_COMMAND_LINE).unwrap().unwrap()),
            Command::Data
        );
        assert!(input.is_empty());
    }

    #[test]
    fn verbs_are_case_insensitive() {
        assert_eq!(Command::parse(b"starttls"), Command::StartTls);
        assert_eq!(Command::parse(b"ehlo relay.test"), Command::Ehlo("relay.test".into()));
        assert_eq!(
            Command::parse(b"mail from: <a@x>"),
            Command::Mail { from: "a@x".into(), params: String::new() }
        );
        assert!(Command::parse(b"AUTH PLAIN AGFAYg==").is_transaction());
        assert_eq!(Command::parse(b"STARTTLS now"), Command::Unknown("STARTTLS".into()));
    }

    #[test]
    fn long_lines_are_refused_without_waiting_for_the_end() {
        let mut input = Input::new();
        input.extend(&[b'a'; 100]);
        assert_eq!(input.next_line(64), Err(LineTooLong { limit: 64 }));
    }

    #[test]
    fn body_unstuffs_and_stops_at_the_dot() {
        let mut input = Input::new();
        let mut body = Body::new();
        input.extend(b"Subject: x\r\n\r\n..leading dot\r\n");
        assert_eq!(body.feed(&mut input).unwrap(), BodyProgress::More);
        input.extend(b".\r\nQUIT\r\n");
        assert_eq!(
            body.feed(&mut input).unwrap(),
            BodyProgress::Done { size: 12 + 2 + 14, overflow: false }
        );
        assert_eq!(input.peek(), b"QUIT\r\n");
    }

    #[test]
    fn replies_are_formatted_with_continuations() {
        assert_eq!(reply(250, &["mx", "STARTTLS"]), "250-mx\r\n250 STARTTLS\r\n");
        assert_eq!(reply(250, &[]), "250\r\n");
        assert_eq!(local_part("<Later@Example.test>"), "later");
    }
}
