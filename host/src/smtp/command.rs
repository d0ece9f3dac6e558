//! SMTP command formatting (RFC 5321 §4.1) into a caller-supplied buffer.
//!
//! Commands are appended to a `Vec<u8>` rather than written, so a pipelined batch (RFC 2920)
//! becomes one buffer and one write, and the formatting can be tested without a socket.
//!
//! Every argument comes from somewhere an attacker can reach (a queued envelope, a policy, a
//! configured host name), so each is checked before a byte is appended: a CR or LF in an
//! address would let it smuggle a second command into the session, and `<` or `>` would let it
//! close the path and add parameters, except inside a well-formed quoted local part
//! (`"a>b"@example.org`, RFC 5321 §4.1.2), where they are data and the relay accepted them
//! inbound. Rejection is a typed error, never a panic, and leaves the buffer as it was.

/// Longest reverse-path or forward-path, angle brackets included (RFC 5321 §4.5.3.1.3), so an
/// address between the brackets may have at most 254 octets.
pub const MAX_PATH_LEN: usize = 256;

/// Longest domain name, in octets (RFC 5321 §4.5.3.1.2).
pub const MAX_DOMAIN_LEN: usize = 255;

/// A command the relay sends as an SMTP client.
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub enum Command {
    /// `EHLO domain`: open the session and ask for the extension list.
    Ehlo(String),
    /// `HELO domain`: open the session with a server that does not speak ESMTP.
    Helo(String),
    /// `STARTTLS` (RFC 3207); nothing may be sent after it until the TLS handshake.
    StartTls,
    /// `MAIL FROM:<from>` with optional ESMTP parameters.
    Mail {
        /// The reverse-path without angle brackets; empty for the null sender of a bounce.
        from: String,
        /// `SIZE=n` (RFC 1870): the message size, so the server can refuse it up front.
        size: Option<u64>,
        /// `BODY=8BITMIME` (RFC 6152): the body contains 8-bit bytes.
        body_8bit: bool,
        /// `REQUIRETLS` (RFC 8689): the message must only travel over verified TLS.
        requiretls: bool,
        /// `SMTPUTF8` (RFC 6531): the message may carry UTF-8 in addresses and headers.
        smtputf8: bool,
    },
    /// `RCPT TO:<to>`.
    Rcpt {
        /// The forward-path without angle brackets; never empty.
        to: String,
    },
    /// `DATA`: the message follows after a 354, dot-stuffed (see the `dot` module).
    Data,
    /// `QUIT`: end the session politely.
    Quit,
    /// `RSET`: abandon the current transaction and keep the connection.
    Rset,
    /// `NOOP`: check that the server is still there, for example before reusing a connection.
    Noop,
}

impl Command {
    /// Appends the command, CRLF included, to `out`.
    ///
    /// Validates every argument first: on error nothing is appended, so a half-built pipelined
    /// batch is never sent with a truncated command in it.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), CommandError> {
        match self {
            Self::Ehlo(domain) | Self::Helo(domain) => {
                check_domain(domain)?;
                out.extend_from_slice(self.verb().as_bytes());
                out.push(b' ');
                out.extend_from_slice(domain.as_bytes());
            }
            Self::Mail { from, size, body_8bit, requiretls, smtputf8 } => {
                check_path(from, Argument::Sender)?;
                out.extend_from_slice(b"MAIL FROM:<");
                out.extend_from_slice(from.as_bytes());
                out.push(b'>');
                if let Some(size) = size {
                    out.extend_from_slice(format!(" SIZE={size}").as_bytes());
                }
                if *body_8bit {
                    out.extend_from_slice(b" BODY=8BITMIME");
                }
                if *requiretls {
                    out.extend_from_slice(b" REQUIRETLS");
                }
                if *smtputf8 {
                    out.extend_from_slice(b" SMTPUTF8");
                }
            }
            Self::Rcpt { to } => {
                if to.is_empty() {
                    return Err(CommandError::Empty { argument: Argument::Recipient });
                }
                check_path(to, Argument::Recipient)?;
                out.extend_from_slice(b"RCPT TO:<");
                out.extend_from_slice(to.as_bytes());
                out.push(b'>');
            }
            Self::StartTls | Self::Data | Self::Quit | Self::Rset | Self::Noop => {
                out.extend_from_slice(self.verb().as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    /// The command verb, such as `"MAIL"`, for logs and tracing fields (never the arguments,
    /// which may be personal data).
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Ehlo(_) => "EHLO",
            Self::Helo(_) => "HELO",
            Self::StartTls => "STARTTLS",
            Self::Mail { .. } => "MAIL",
            Self::Rcpt { .. } => "RCPT",
            Self::Data => "DATA",
            Self::Quit => "QUIT",
            Self::Rset => "RSET",
            Self::Noop => "NOOP",
        }
    }
}

/// Checks an `EHLO`/`HELO` argument: a domain or address literal is printable ASCII without
/// spaces, so anything else is refused rather than passed on for the server to misread.
fn check_domain(domain: &str) -> Result<(), CommandError> {
    let argument = Argument::Domain;
    if domain.is_empty() {
        return Err(CommandError::Empty { argument });
    }
    if domain.len() > MAX_DOMAIN_LEN {
        return Err(CommandError::TooLong { argument, len: domain.len(), max: MAX_DOMAIN_LEN });
    }
    for (offset, ch) in domain.char_indices() {
        if ch.is_control() {
            return Err(CommandError::ControlChar { argument, offset, ch });
        }
        if !ch.is_ascii_graphic() {
            return Err(CommandError::ForbiddenChar { argument, offset, ch });
        }
    }
    Ok(())
}

/// Checks an address for a path. Non-ASCII is allowed (SMTPUTF8 addresses); whether the server
/// accepts it is the session's concern. `<` and `>` are the way to break out of the path, so
/// they are refused everywhere but inside a quoted local part that is well formed (RFC 5321
/// §4.1.2: `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`, a backslash quoting the next
/// character, then `@`): there a server that parses the path by the RFC reads them as data,
/// and refusing them would strand a recipient the relay already accepted.
fn check_path(address: &str, argument: Argument) -> Result<(), CommandError> {
    if address.len() + 2 > MAX_PATH_LEN {
        return Err(CommandError::TooLong { argument, len: address.len() + 2, max: MAX_PATH_LEN });
    }
    let quoted = quoted_local_part_len(address);
    for (offset, ch) in address.char_indices() {
        if ch.is_control() {
            return Err(CommandError::ControlChar { argument, offset, ch });
        }
        if (ch == '<' || ch == '>') && offset >= quoted {
            return Err(CommandError::ForbiddenChar { argument, offset, ch });
        }
    }
    Ok(())
}

/// The length of the address's quoted local part, closing quote included, when the address
/// starts with one that is well formed and followed by `@`; 0 otherwise.
fn quoted_local_part_len(address: &str) -> usize {
    let bytes = address.as_bytes();
    if bytes.first() != Some(&b'"') {
        return 0;
    }
    let mut i = 1;
    while i < bytes.len() {
        match bytes[i] {
            // A quoted pair: the next byte is data, whatever it is (control characters are
            // refused by the caller anyway).
            b'\\' => i += 2,
            b'"' => return if bytes.get(i + 1) == Some(&b'@') { i + 1 } else { 0 },
            _ => i += 1,
        }
    }
    0
}

/// Which argument of a command was refused.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[non_exhaustive]
pub enum Argument {
    /// The domain of `EHLO` or `HELO`.
    Domain,
    /// The reverse-path of `MAIL FROM`.
    Sender,
    /// The forward-path of `RCPT TO`.
    Recipient,
}

impl std::fmt::Display for Argument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Domain => "domain",
            Self::Sender => "sender",
            Self::Recipient => "recipient",
        })
    }
}

/// Why a command could not be encoded.
///
/// These are bugs or hostile data upstream (a queued envelope, a policy result), never
/// something the server did, so the message should fail rather than be retried.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// A control character (CR, LF, NUL, DEL, C1 and the rest), which could inject a command.
    #[error("{argument} has control character {ch:?} at byte {offset}")]
    ControlChar {
        /// The argument refused.
        argument: Argument,
        /// Byte offset of the character in the argument.
        offset: usize,
        /// The character.
        ch: char,
    },
    /// A character not allowed in this argument: `<` or `>` in a path, or anything but
    /// printable ASCII (including a space) in a domain.
    #[error("{argument} has forbidden character {ch:?} at byte {offset}")]
    ForbiddenChar {
        /// The argument refused.
        argument: Argument,
        /// Byte offset of the character in the argument.
        offset: usize,
        /// The character.
        ch: char,
    },
    /// The argument is longer than RFC 5321 allows.
    #[error("{argument} is {len} octets, more than {max}")]
    TooLong {
        /// The argument refused.
        argument: Argument,
        /// Its length (for a path, with the angle brackets).
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The argument is empty where a value is required (a domain, or a recipient).
    #[error("{argument} is empty")]
    Empty {
        /// The argument refused.
        argument: Argument,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(command: &Command) -> String {
        let mut out = Vec::new();
        command.encode(&mut out).expect("valid command");
        String::from_utf8(out).expect("ASCII")
    }

    fn mail(from: &str) -> Command {
        Command::Mail {
            from: from.to_owned(),
            size: None,
            body_8bit: false,
            requiretls: false,
            smtputf8: false,
        }
    }

    fn rcpt(to: &str) -> Command {
        Command::Rcpt { to: to.to_owned() }
    }

    #[test]
    fn encodes_every_command() {
        let cases = [
            (Command::Ehlo("relay.example".into()), "EHLO relay.example\r\n"),
            (Command::Helo("[192.0.2.1]".into()), "HELO [192.0.2.1]\r\n"),
            (Command::StartTls, "STARTTLS\r\n"),
            (mail("a@example.org"), "MAIL FROM:<a@example.org>\r\n"),
            (mail(""), "MAIL FROM:<>\r\n"),
            (
                Command::Mail {
                    from: "a@example.org".into(),
                    size: Some(12345),
                    body_8bit: true,
                    requiretls: true,
                    smtputf8: false,
                },
                "MAIL FROM:<a@example.org> SIZE=12345 BODY=8BITMIME REQUIRETLS\r\n",
            ),
            (
                Command::Mail {
                    from: String::new(),
                    size: Some(0),
                    body_8bit: false,
                    requiretls: true,
                    smtputf8: true,
                },
                "MAIL FROM:<> SIZE=0 REQUIRETLS SMTPUTF8\r\n",
            ),
            (rcpt("b@example.net"), "RCPT TO:<b@example.net>\r\n"),
            (rcpt("\"john doe\"@example.net"), "RCPT TO:<\"john doe\"@example.net>\r\n"),
            (rcpt("\"a>b\"@example.test"), "RCPT TO:<\"a>b\"@example.test>\r\n"),
            (rcpt("\"<a\\\">\"@example.test"), "RCPT TO:<\"<a\\\">\"@example.test>\r\n"),
            (mail("\"x<y\"@example.org"), "MAIL FROM:<\"x<y\"@example.org>\r\n"),
            (rcpt("Postmaster"), "RCPT TO:<Postmaster>\r\n"),
            (rcpt("j\u{f6}rg@b\u{fc}cher.example"), "RCPT TO:<j\u{f6}rg@b\u{fc}cher.example>\r\n"),
            (Command::Data, "DATA\r\n"),
            (Command::Quit, "QUIT\r\n"),
            (Command::Rset, "RSET\r\n"),
            (Command::Noop, "NOOP\r\n"),
        ];
        for (command, wire) in cases {
            assert_eq!(encoded(&command), wire);
            assert!(wire.starts_with(command.verb()));
        }
    }

    #[test]
    fn pipelined_batch_is_one_buffer() {
        let mut out = Vec::new();
        for command in [mail("a@x.example"), rcpt("b@y.example"), Command::Data] {
            command.encode(&mut out).unwrap();
        }
        assert_eq!(out, b"MAIL FROM:<a@x.example>\r\nRCPT TO:<b@y.example>\r\nDATA\r\n");
    }

    #[test]
    fn injection_attempts_are_rejected_and_leave_the_buffer_alone() {
        use Argument::*;
        use CommandError::*;
        #[rustfmt::skip]
        let cases = [
            (mail("a@b.example>\r\nRCPT TO:<v@c.example"), ForbiddenChar { argument: Sender, offset: 11, ch: '>' }),
            (mail("a@b.example\r\nRSET"), ControlChar { argument: Sender, offset: 11, ch: '\r' }),
            (mail("a@b.example\nDATA"), ControlChar { argument: Sender, offset: 11, ch: '\n' }),
            (mail("a\0@b.example"), ControlChar { argument: Sender, offset: 1, ch: '\0' }),
            (mail("a\t@b.example"), ControlChar { argument: Sender, offset: 1, ch: '\t' }),
            (mail("a\u{7f}@b"), ControlChar { argument: Sender, offset: 1, ch: '\u{7f}' }),
            (mail("a\u{85}@b"), ControlChar { argument: Sender, offset: 1, ch: '\u{85}' }),
            (mail("a@b> SIZE=1"), ForbiddenChar { argument: Sender, offset: 3, ch: '>' }),
            (rcpt("x@y\r\nQUIT"), ControlChar { argument: Recipient, offset: 3, ch: '\r' }),
            (rcpt("<x@y>"), ForbiddenChar { argument: Recipient, offset: 0, ch: '<' }),
            // Only a well-formed quoted local part shelters `<` and `>`.
            (rcpt("\"a\"@b>"), ForbiddenChar { argument: Recipient, offset: 5, ch: '>' }),
            (rcpt("\"a>b@c"), ForbiddenChar { argument: Recipient, offset: 2, ch: '>' }),
            (rcpt("\"a>\"b@c"), ForbiddenChar { argument: Recipient, offset: 2, ch: '>' }),
            (rcpt("\"a\\\">b@c"), ForbiddenChar { argument: Recipient, offset: 4, ch: '>' }),
            (rcpt("x\"a>b\"@c"), ForbiddenChar { argument: Recipient, offset: 3, ch: '>' }),
            (mail("\"a>\"@b> NOTIFY=NEVER"), ForbiddenChar { argument: Sender, offset: 6, ch: '>' }),
            (rcpt(""), Empty { argument: Recipient }),
            (Command::Ehlo("r.example\r\nMAIL FROM:<>".into()), ControlChar { argument: Domain, offset: 9, ch: '\r' }),
            (Command::Ehlo("r.example AUTH".into()), ForbiddenChar { argument: Domain, offset: 9, ch: ' ' }),
            (Command::Helo("r\u{e9}lay.example".into()), ForbiddenChar { argument: Domain, offset: 1, ch: '\u{e9}' }),
            (Command::Helo(String::new()), Empty { argument: Domain }),
        ];
        for (command, expected) in cases {
            let mut out = b"NOOP\r\n".to_vec();
            assert_eq!(command.encode(&mut out), Err(expected), "{command:?}");
            assert_eq!(out, b"NOOP\r\n");
        }
    }

    #[test]
    fn length_limits() {
        let local = "a".repeat(64);
        let ok = format!("{local}@{}", "b".repeat(254 - 65));
        assert_eq!(ok.len(), 254);
        assert!(mail(&ok).encode(&mut Vec::new()).is_ok());
        let long = format!("{ok}c");
        assert_eq!(
            Command::Rcpt { to: long }.encode(&mut Vec::new()),
            Err(CommandError::TooLong { argument: Argument::Recipient, len: 257, max: 256 })
        );
        assert!(Command::Ehlo("d".repeat(255)).encode(&mut Vec::new()).is_ok());
        assert_eq!(
            Command::Ehlo("d".repeat(256)).encode(&mut Vec::new()),
            Err(CommandError::TooLong { argument: Argument::Domain, len: 256, max: 255 })
        );
    }

    #[test]
    fn errors_display_without_panicking() {
        let err = mail("a\r").encode(&mut Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "sender has control character '\\r' at byte 1");
    }
}
