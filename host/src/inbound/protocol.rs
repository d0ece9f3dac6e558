//! The server side of SMTP, without I/O (RFC 5321, with RFC 1870 SIZE, RFC 2034
//! ENHANCEDSTATUSCODES, RFC 2920 PIPELINING, RFC 3207 STARTTLS, RFC 4954 AUTH, RFC 6152
//! 8BITMIME and RFC 8689 REQUIRETLS).
//!
//! [`Session`] owns the bytes received and not yet used, and turns them into replies and
//! [`Action`]s. The connection layer feeds it with [`Session::receive`], asks
//! [`Session::next_action`] what to do, and sends the replies the session queued whenever it
//! is told to read: so every reply to a pipelined batch that arrived in one read leaves in one
//! write, in order (RFC 2920 §3.2).
//!
//! Everything is bounded by the options: a command line longer than `max_line_length` is
//! skipped up to its LF without being stored and answered `500 5.5.6`; the message body stops
//! being stored once it passes `max_message_size` but is read to its end, so the session stays
//! in step with the client, and answered `552 5.3.4`. Lines end in CRLF only: a bare LF never
//! ends a command, and only `CRLF . CRLF` ends the body (SMTP smuggling, CVE-2023-51766).
//!
//! The STARTTLS switch happens in the connection layer, but the defence that goes with it is
//! here: when the session accepts `STARTTLS` it drops every byte buffered after that command
//! (the server side of CVE-2011-0411), and after the handshake it forgets the EHLO, the
//! envelope and everything else learnt in plaintext (RFC 3207 §4.2).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::anvil::{Anvil, InboundStats};
use super::auth::{base64_decode, base64_encode, verify_password};
use super::{BareNewline, InboundOptions, Submission};
use crate::smtp::{EnhancedCode, MAX_DOMAIN_LEN, MAX_PATH_LEN};

/// Failed AUTH attempts a client may make before it is disconnected.
const MAX_AUTH_FAILURES: u32 = 3;

/// Command lines are never limited below this, whatever the options say.
const MIN_LINE_LENGTH: usize = 512;

/// A hash that matches no password, checked for unknown users so that the time taken does not
/// tell which user names exist.
const DUMMY_HASH: &str =
    "sha256:00:0000000000000000000000000000000000000000000000000000000000000000";

/// The reply to AUTH from an address that failed too often recently (RFC 4954 §6: 454 is a
/// temporary authentication failure).
fn auth_refused_reply() -> Reply {
    Reply::status(
        454,
        (4, 7, 0),
        "too many authentication failures from your address; try again later",
    )
}

/// The longest reply line, CRLF included (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY_LINE: usize = 512;

/// One SMTP reply the server sends.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Reply {
    code: u16,
    enhanced: Option<EnhancedCode>,
    lines: Vec<String>,
}

impl Reply {
    /// A one-line reply with an enhanced status code (RFC 2034 §4 wants one on every reply
    /// but the greeting, HELO and EHLO).
    pub(crate) fn status(code: u16, enhanced: (u8, u16, u16), text: impl Into<String>) -> Self {
        let (class, subject, detail) = enhanced;
        Reply {
            code,
            enhanced: Some(EnhancedCode { class, subject, detail }),
            lines: vec![printable(&text.into())],
        }
    }

    /// A reply without an enhanced status code: the greeting, HELO, EHLO, 334 and 354.
    pub(crate) fn plain(code: u16, lines: Vec<String>) -> Self {
        let mut lines: Vec<String> = lines.iter().map(|l| printable(l)).collect();
        if lines.is_empty() {
            lines.push(String::new());
        }
        Reply { code, enhanced: None, lines }
    }

    /// The three-digit code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The enhanced status code, if the reply has one.
    pub fn enhanced(&self) -> Option<EnhancedCode> {
        self.enhanced
    }

    /// The text of each line, without code, enhanced code or CRLF.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Appends the reply as sent on the wire, every line ending in CRLF and at most
    /// [`MAX_REPLY_LINE`] octets long: text that echoes the client (an unknown MAIL parameter,
    /// say) is cut, ending in `...`, so a long argument cannot make a reply line no client has
    /// to accept (RFC 5321 §4.5.3.1.5; found by fuzzing, fuzz/session).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            let mut text = match self.enhanced {
                Some(code) => format!("{}{sep}{code} {line}", self.code),
                None => format!("{}{sep}{line}", self.code),
            };
            if text.len() + 2 > MAX_REPLY_LINE {
                // Lines are printable ASCII (see `printable`): any byte is a char boundary.
                text.truncate(MAX_REPLY_LINE - 2 - 3);
                text.push_str("...");
            }
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The reply as on the wire, without the final CRLF (for logs and assertions).
impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Vec::new();
        self.encode(&mut out);
        let text = String::from_utf8_lossy(&out);
        f.write_str(text.trim_end_matches("\r\n"))
    }
}

/// Replaces anything but printable ASCII and space, so no text can break a reply or header
/// line.
fn printable(text: &str) -> String {
    text.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect()
}

/// A command the server understood (RFC 5321 §4.1.1, RFC 3207, RFC 4954).
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Command {
    /// `EHLO domain`.
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<path> [params]`; the path without brackets, empty for `<>`.
    Mail {
        /// The reverse-path without angle brackets.
        from: String,
        /// The ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path>`; the path without brackets.
    Rcpt {
        /// The forward-path without angle brackets (and without any source route).
        to: String,
    },
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [string]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `STARTTLS`.
    StartTls,
    /// `AUTH mechanism [initial-response]`.
    Auth {
        /// The mechanism name, upper-cased.
        mechanism: String,
        /// The base64 initial response (`=` for an empty one), if given.
        initial: Option<String>,
    },
    /// `VRFY string`.
    Vrfy,
    /// `HELP [string]`.
    Help,
}

/// The ESMTP parameters of `MAIL FROM` the server knows.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct MailParams {
    /// `SIZE=n` (RFC 1870), saturated at `u64::MAX`.
    pub size: Option<u64>,
    /// `BODY=8BITMIME` (RFC 6152); `BODY=7BIT` leaves it false.
    pub body_8bit: bool,
    /// `REQUIRETLS` (RFC 8689).
    pub requiretls: bool,
    /// `AUTH=...` (RFC 4954 §5) was given; its value is not used.
    pub auth: bool,
    /// `SMTPUTF8` (RFC 6531): addresses and headers may hold UTF-8.
    pub smtputf8: bool,
}

/// Parses one command line, without its CRLF.
///
/// The verb is case-insensitive. The error is the reply to send: `500 5.5.1` for an unknown
/// verb, `501` for bad syntax, `553 5.6.7` for a non-ASCII sender without `SMTPUTF8` (RFC 6531
/// §3.4; a recipient is judged against its transaction by the session), `555 5.5.4` for an
/// unknown or unsupported MAIL or RCPT parameter. Addresses may hold UTF-8 (RFC 6531 §3.3);
/// nothing else may.
pub fn parse_command(line: &[u8]) -> Result<Command, Reply> {
    let (verb, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let verb = verb.to_ascii_uppercase();
    let is_path_command = matches!(verb.as_slice(), b"MAIL" | b"RCPT");
    if !rest.is_ascii() && !is_path_command {
        return Err(syntax("non-ASCII characters in command"));
    }
    let rest = std::str::from_utf8(rest)
        .map_err(|_| Reply::status(553, (5, 6, 7), "address is not valid UTF-8"))?;
    if rest.chars().any(char::is_control) {
        return Err(syntax("control characters in command"));
    }
    let rest = rest.trim_end_matches(' ');
    match verb.as_slice() {
        b"EHLO" => Ok(Command::Ehlo(helo_domain(rest)?)),
        b"HELO" => Ok(Command::Helo(helo_domain(rest)?)),
        b"MAIL" => {
            let rest = strip_prefix_ci(rest, "FROM:")
                .ok_or_else(|| syntax("expected MAIL FROM:<address>"))?;
            let (from, params) = parse_path(rest, PathRole::Sender)?;
            let params = parse_mail_params(params)?;
            if !from.is_ascii() && !params.smtputf8 {
                return Err(Reply::status(553, (5, 6, 7), "non-ASCII address needs SMTPUTF8"));
            }
            Ok(Command::Mail { from, params })
        }
        b"RCPT" => {
            let rest =
                strip_prefix_ci(rest, "TO:").ok_or_else(|| syntax("expected RCPT TO:<address>"))?;
            let (to, params) = parse_path(rest, PathRole::Recipient)?;
            if !params.is_ascii() {
                return Err(syntax("non-ASCII characters in a parameter"));
            }
            if let Some(param) = params.split(' ').find(|p| !p.is_empty()) {
                let key = param.split('=').next().unwrap_or(param);
                return Err(unsupported_param(key));
            }
            Ok(Command::Rcpt { to })
        }
        b"DATA" => no_arguments(rest, Command::Data),
        b"RSET" => no_arguments(rest, Command::Rset),
        b"QUIT" => no_arguments(rest, Command::Quit),
        b"STARTTLS" => no_arguments(rest, Command::StartTls),
        b"NOOP" => Ok(Command::Noop),
        b"HELP" => Ok(Command::Help),
        b"VRFY" => Ok(Command::Vrfy),
        b"AUTH" => {
            let mut words = rest.split(' ').filter(|w| !w.is_empty());
            let mechanism =
                words.next().ok_or_else(|| syntax("expected AUTH mechanism"))?.to_ascii_uppercase();
            let initial = words.next().map(str::to_owned);
            if words.next().is_some() {
                return Err(syntax("too many AUTH arguments"));
            }
            Ok(Command::Auth { mechanism, initial })
        }
        _ => Err(Reply::status(500, (5, 5, 1), "command not recognized")),
    }
}

fn syntax(text: &str) -> Reply {
    Reply::status(501, (5, 5, 4), text)
}

fn unsupported_param(key: &str) -> Reply {
    Reply::status(555, (5, 5, 4), format!("parameter {} not supported", printable(key)))
}

fn no_arguments(rest: &str, command: Command) -> Result<Command, Reply> {
    if rest.is_empty() { Ok(command) } else { Err(syntax("no arguments allowed")) }
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

fn helo_domain(rest: &str) -> Result<String, Reply> {
    if rest.is_empty() {
        return Err(syntax("expected a domain name"));
    }
    if valid_domain(rest, true) { Ok(rest.to_owned()) } else { Err(syntax("invalid domain name")) }
}

/// A domain (letters, digits, hyphens; underscores too when `lenient`, for EHLO names of
/// hosts that have them) or an address literal in brackets.
fn valid_domain(domain: &str, lenient: bool) -> bool {
    if domain.is_empty() || domain.len() > MAX_DOMAIN_LEN {
        return false;
    }
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'[' | b']' | b'\\'))
        });
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || (lenient && b == b'_'))
    })
}

#[derive(Clone, Copy, Eq, PartialEq)]
enum PathRole {
    Sender,
    Recipient,
}

impl PathRole {
    fn bad(self, text: &str) -> Reply {
        match self {
            PathRole::Sender => Reply::status(501, (5, 1, 7), text),
            PathRole::Recipient => Reply::status(501, (5, 1, 3), text),
        }
    }
}

/// Parses `<path>` (after `FROM:` or `TO:`, one optional space allowed before it) and returns
/// the address and the text after the `>`. `rest` is ASCII without control characters.
fn parse_path(rest: &str, role: PathRole) -> Result<(String, &str), Reply> {
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let inner =
        rest.strip_prefix('<').ok_or_else(|| role.bad("the address must be in angle brackets"))?;
    let mut quoted = false;
    let mut escaped = false;
    let mut end = None;
    for (i, b) in inner.bytes().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted {
            match b {
                b'\\' => escaped = true,
                b'"' => quoted = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => quoted = true,
                b'>' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
    }
    let end = end.ok_or_else(|| role.bad("unterminated address"))?;
    let (path, after) = (&inner[..end], &inner[end + 1..]);
    if !after.is_empty() && !after.starts_with(' ') {
        return Err(role.bad("unexpected characters after the address"));
    }
    if path.len() + 2 > MAX_PATH_LEN {
        return Err(role.bad("address too long"));
    }
    if path.is_empty() {
        return match role {
            PathRole::Sender => Ok((String::new(), after)),
            PathRole::Recipient => Err(role.bad("empty recipient address")),
        };
    }
    // RFC 5321 §4.1.2 and §C: a source route is accepted and ignored.
    let mailbox = if path.starts_with('@') {
        let (route, mailbox) =
            path.split_once(':').ok_or_else(|| role.bad("malformed source route"))?;
        if !route
            .split(',')
            .all(|hop| hop.strip_prefix('@').is_some_and(|d| valid_domain(d, false)))
        {
            return Err(role.bad("malformed source route"));
        }
        mailbox
    } else {
        path
    };
    if !valid_mailbox(mailbox) {
        return Err(role.bad("invalid address"));
    }
    Ok((mailbox.to_owned(), after))
}

/// `local-part@domain` with a dot-string or quoted-string local part (RFC 5321 §4.1.2). Dots
/// may be anywhere in a dot-string: real mail has `john..doe`, and refusing it helps no one.
fn valid_mailbox(mailbox: &str) -> bool {
    let Some((local, domain)) = mailbox.rsplit_once('@') else {
        return false;
    };
    if local.is_empty() || !valid_mailbox_domain(domain) {
        return false;
    }
    // An address literal in a mailbox is an IP address (`[192.0.2.1]`, `[IPv6:2001:db8::1]`):
    // anything else is refused here rather than accepted and then unsendable (the client side
    // refuses `<` and `>` outside a quoted local part).
    if let Some(literal) = domain.strip_prefix('[')
        && !literal.bytes().all(|b| b.is_ascii_alphanumeric() || b"[]:.-".contains(&b))
    {
        return false;
    }
    if let Some(quoted) = local.strip_prefix('"') {
        let Some(content) = quoted.strip_suffix('"') else {
            return false;
        };
        let mut escaped = false;
        for b in content.bytes() {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                return false;
            }
        }
        !escaped
    } else {
        // RFC 6531 §3.3: atext also takes any UTF-8 beyond ASCII.
        local.chars().all(|c| {
            c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c) || !c.is_ascii()
        })
    }
}

/// A mailbox's domain: as [`valid_domain`], and U-labels too (RFC 6531 §3.3, `sub-domain =/
/// U-label`): any character beyond ASCII that is not a control or a space.
fn valid_mailbox_domain(domain: &str) -> bool {
    if domain.is_ascii() {
        return valid_domain(domain, false);
    }
    domain.len() <= MAX_DOMAIN_LEN
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.chars().count() <= 63
                && label.chars().all(|c| {
                    c.is_ascii_alphanumeric()
                        || c == '-'
                        || (!c.is_ascii() && !c.is_control() && !c.is_whitespace())
                })
        })
}

fn parse_mail_params(text: &str) -> Result<MailParams, Reply> {
    if !text.is_ascii() {
        return Err(syntax("non-ASCII characters in a parameter"));
    }
    let mut params = MailParams::default();
    let mut seen: Vec<String> = Vec::new();
    for param in text.split(' ').filter(|p| !p.is_empty()) {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(syntax("malformed parameter"));
        }
        if value.is_some_and(|v| v.is_empty() || v.contains('=')) {
            return Err(syntax("malformed parameter value"));
        }
        let key = key.to_ascii_uppercase();
        if seen.contains(&key) {
            return Err(syntax("duplicate parameter"));
        }
        match (key.as_str(), value) {
            ("SIZE", Some(v)) => {
                if v.len() > 20 || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(syntax("SIZE must be a number"));
                }
                params.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => params.body_8bit = false,
            ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => params.body_8bit = true,
            ("BODY", Some(_)) => {
                return Err(Reply::status(555, (5, 5, 4), "BODY value not supported"));
            }
            ("REQUIRETLS", None) => params.requiretls = true,
            ("SMTPUTF8", None) => params.smtputf8 = true,
            ("AUTH", Some(_)) => params.auth = true,
            ("SIZE" | "BODY" | "AUTH", None) | ("REQUIRETLS" | "SMTPUTF8", Some(_)) => {
                return Err(syntax("malformed parameter value"));
            }
            _ => return Err(unsupported_param(&key)),
        }
        seen.push(key);
    }
    Ok(params)
}

/// What the connection layer must do next.
#[derive(Debug)]
#[must_use]
pub enum Action {
    /// Send the queued replies ([`Session::write_replies`]), then wait for more input and
    /// pass it to [`Session::receive`].
    Read,
    /// The `220` to STARTTLS is queued: send it, then run the TLS handshake on the same
    /// stream and call [`Session::tls_established`], or drop the connection if it fails.
    /// Bytes that were already buffered after the command have been dropped (`discarded`
    /// counts them); nothing read before the handshake is ever used.
    StartTls {
        /// Bytes received after `STARTTLS` and thrown away.
        discarded: usize,
    },
    /// A message is complete: hand it to the spool and report the result with
    /// [`Session::submitted`]. Until then the session processes no input.
    Submit(Box<PendingSubmission>),
    /// Send the queued replies and close the connection.
    Close,
}

/// A complete message waiting for the spool.
pub struct PendingSubmission {
    /// [`Session::message_number`] of this message.
    number: u64,
    mail_from: String,
    rcpts: Vec<String>,
    /// What the session still holds of the message (all of it unless the connection layer
    /// took the rest as it arrived).
    body: Vec<u8>,
    size: usize,
    requiretls: bool,
    tls_required_no: bool,
    smtputf8: bool,
    trace: Trace,
}

/// What the `Received:` line says about the session.
#[derive(Clone, Debug)]
struct Trace {
    client: SocketAddr,
    helo: String,
    extended: bool,
    hostname: String,
    tls: Option<String>,
    authenticated_as: Option<String>,
}

impl PendingSubmission {
    /// The message size in bytes, without the `Received:` line.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Takes what the session still holds of the message: the end of one whose start went to
    /// the spool as it arrived ([`Session::take_body`]).
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// The submission for a message written to the spool's staging file as it arrived, its
    /// `Received:` line first ([`Session::received_header`]).
    pub fn into_staged_submission(
        self,
        received_at: SystemTime,
        staged: super::StagedBody,
    ) -> Submission {
        Submission {
            mail_from: self.mail_from,
            rcpts: self.rcpts,
            body: Vec::new(),
            staged: Some(staged),
            requiretls: self.requiretls,
            tls_required_no: self.tls_required_no,
            smtputf8: self.smtputf8,
            client: self.trace.client,
            tls: self.trace.tls.is_some(),
            authenticated_as: self.trace.authenticated_as,
            received_at,
        }
    }

    /// The recipients.
    pub fn rcpts(&self) -> &[String] {
        &self.rcpts
    }

    /// The [`Session::message_number`] this message had in DATA.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The submission for the spool, with a `Received:` line (RFC 5321 §4.4) for
    /// `received_at` prepended to the body.
    pub fn into_submission(self, received_at: SystemTime) -> Submission {
        let header = received_header(&self.trace, &self.rcpts, self.smtputf8, received_at);
        let mut body = Vec::with_capacity(header.len() + self.body.len());
        body.extend_from_slice(header.as_bytes());
        body.extend_from_slice(&self.body);
        Submission {
            mail_from: self.mail_from,
            rcpts: self.rcpts,
            body,
            staged: None,
            requiretls: self.requiretls,
            tls_required_no: self.tls_required_no,
            smtputf8: self.smtputf8,
            client: self.trace.client,
            tls: self.trace.tls.is_some(),
            authenticated_as: self.trace.authenticated_as,
            received_at,
        }
    }
}

/// The body is summarised by its size.
impl fmt::Debug for PendingSubmission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingSubmission")
            .field("mail_from", &self.mail_from)
            .field("rcpts", &self.rcpts)
            .field("size", &self.size)
            .field("requiretls", &self.requiretls)
            .field("tls_required_no", &self.tls_required_no)
            .field("trace", &self.trace)
            .finish()
    }
}

/// `Received: from helo ([ip]) by host with ESMTPSA (tls) for <rcpt>; date`. The `for`
/// clause is only written for a single recipient, so the line does not list Bcc recipients.
fn received_header(trace: &Trace, rcpts: &[String], utf8: bool, at: SystemTime) -> String {
    let ip = match trace.client.ip().to_canonical() {
        IpAddr::V4(ip) => format!("[{ip}]"),
        IpAddr::V6(ip) => format!("[IPv6:{ip}]"),
    };
    // RFC 3848 protocol types; RFC 6531 §3.7.3 for a transaction with SMTPUTF8.
    let protocol = match (trace.extended, trace.tls.is_some(), trace.authenticated_as.is_some()) {
        (false, _, _) => "SMTP",
        (true, false, false) if utf8 => "UTF8SMTP",
        (true, true, false) if utf8 => "UTF8SMTPS",
        (true, false, true) if utf8 => "UTF8SMTPA",
        (true, true, true) if utf8 => "UTF8SMTPSA",
        (true, false, false) => "ESMTP",
        (true, true, false) => "ESMTPS",
        (true, false, true) => "ESMTPA",
        (true, true, true) => "ESMTPSA",
    };
    let tls = trace.tls.as_deref().map(|t| format!(" ({})", printable(t))).unwrap_or_default();
    let rcpt = match rcpts {
        [only] => format!("\r\n\tfor <{only}>"),
        _ => String::new(),
    };
    format!(
        "Received: from {} ({ip})\r\n\tby {} with {protocol}{tls}{rcpt};\r\n\t{}\r\n",
        trace.helo,
        printable(&trace.hostname),
        rfc5322_date(at)
    )
}

/// `Tue, 1 Jul 2025 09:30:00 +0000` (RFC 5322 §3.3), in UTC.
fn rfc5322_date(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), in u64 since the
    // date is never before the epoch here.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{}, {day} {} {year} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Whether the message's header block holds `TLS-Required: No` (RFC 8689 §5).
///
/// The field name and the value are case-insensitive, folded values are unfolded, and only
/// the header block (up to the first empty line) is looked at. Linear in the header size.
pub fn tls_required_no(message: &[u8]) -> bool {
    let mut found = false;
    let mut current: Option<Vec<u8>> = None;
    let finish = |field: Option<Vec<u8>>| -> bool {
        let Some(field) = field else { return false };
        let Some(colon) = field.iter().position(|&b| b == b':') else { return false };
        let (name, value) = (&field[..colon], &field[colon + 1..]);
        name.trim_ascii().eq_ignore_ascii_case(b"TLS-Required")
            && value.trim_ascii().eq_ignore_ascii_case(b"No")
    };
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if matches!(line[0], b' ' | b'\t') {
            if let Some(field) = current.as_mut() {
                // Only the first field that could be TLS-Required needs its value kept whole.
                if field.len() < 256 {
                    field.extend_from_slice(line);
                }
            }
            continue;
        }
        found |= finish(current.take());
        current = Some(line.iter().take(256).copied().collect());
    }
    found | finish(current)
}

/// How much of the start of a message is kept to look at its header block (`TLS-Required:`)
/// when the rest goes to the spool as it arrives. A header block longer than this is unusual;
/// a field beyond it is not seen, which can only make the relay stricter.
const HEAD_MAX: usize = 64 * 1024;

/// Decodes the message after `354`: strips the stuffed dots (RFC 5321 §4.5.2), stops after
/// `CRLF . CRLF`, and stops storing (but not reading) once the size limit is passed.
///
/// Feed it in chunks of any size; the result does not depend on where they are split.
#[derive(Clone, Debug)]
pub struct BodyDecoder {
    state: DotState,
    /// Decoded bytes not yet taken ([`take_body`](Self::take_body)).
    body: Vec<u8>,
    /// Decoded bytes so far, taken or not.
    size: usize,
    /// The first [`HEAD_MAX`] decoded bytes, where the header block is looked at.
    head: Vec<u8>,
    max_size: usize,
    overflow: bool,
    done: bool,
    /// Bytes of input used so far (for the transfer rate).
    consumed: u64,
    /// What the message holds that the relay has rules about.
    found: BodyFindings,
}

/// What the decoder saw in a message that the relay has rules about.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct BodyFindings {
    /// A NUL byte (refused: RFC 5321 text has none, and receivers truncate at it).
    pub nul: bool,
    /// A LF not preceded by CR.
    pub bare_lf: bool,
    /// A CR not followed by LF.
    pub bare_cr: bool,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum DotState {
    /// After CRLF, or at the start of the message.
    LineStart,
    /// A `.` at the start of a line.
    Dot,
    /// `.` CR at the start of a line.
    DotCr,
    /// Inside a line.
    Middle,
    /// After a CR (which has been stored).
    Cr,
}

impl BodyDecoder {
    /// A decoder at the start of a message that keeps at most `max_size` bytes.
    pub fn new(max_size: usize) -> Self {
        BodyDecoder {
            state: DotState::LineStart,
            body: Vec::new(),
            size: 0,
            head: Vec::new(),
            max_size,
            overflow: false,
            done: false,
            consumed: 0,
            found: BodyFindings::default(),
        }
    }

    /// Decodes from the start of `input` and returns how many bytes it used: all of them, or
    /// up to and including the final `CRLF . CRLF` once it is found ([`is_done`](Self::is_done)).
    pub fn feed(&mut self, input: &[u8]) -> usize {
        let mut i = 0;
        while i < input.len() && !self.done {
            if self.state == DotState::Middle {
                // Fast path: copy up to the next CR in one go.
                let run = input[i..].iter().position(|&b| b == b'\r').unwrap_or(input.len() - i);
                let text = &input[i..i + run];
                self.found.bare_lf |= text.contains(&b'\n');
                self.found.nul |= text.contains(&0);
                self.store(text);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.state = match self.state {
                DotState::LineStart => match b {
                    b'.' => DotState::Dot,
                    _ => self.inside(b),
                },
                DotState::Dot => match b {
                    b'\r' => DotState::DotCr,
                    _ => self.inside(b),
                },
                DotState::DotCr => {
                    if b == b'\n' {
                        self.done = true;
                        DotState::LineStart
                    } else {
                        // `.` CR x: the dot was stuffing, the CR is content.
                        self.store(b"\r");
                        self.after_cr(b)
                    }
                }
                DotState::Middle => self.inside(b),
                DotState::Cr => self.after_cr(b),
            };
        }
        self.consumed += i as u64;
        i
    }

    fn inside(&mut self, b: u8) -> DotState {
        self.found.bare_lf |= b == b'\n';
        self.found.nul |= b == 0;
        self.store(&[b]);
        if b == b'\r' { DotState::Cr } else { DotState::Middle }
    }

    fn after_cr(&mut self, b: u8) -> DotState {
        self.found.bare_cr |= b != b'\n';
        self.found.nul |= b == 0;
        self.store(&[b]);
        match b {
            b'\n' => DotState::LineStart,
            b'\r' => DotState::Cr,
            _ => DotState::Middle,
        }
    }

    fn store(&mut self, bytes: &[u8]) {
        if self.overflow {
            return;
        }
        if self.size + bytes.len() > self.max_size {
            self.overflow = true;
            self.body = Vec::new();
            self.head = Vec::new();
        } else {
            self.size += bytes.len();
            if self.head.len() < HEAD_MAX {
                let keep = bytes.len().min(HEAD_MAX - self.head.len());
                self.head.extend_from_slice(&bytes[..keep]);
            }
            self.body.extend_from_slice(bytes);
        }
    }

    /// Whether the end of data has been read.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether the message passed the size limit (its bytes were dropped).
    pub fn overflowed(&self) -> bool {
        self.overflow
    }

    /// What the message held so far that the relay has rules about.
    pub fn findings(&self) -> BodyFindings {
        self.found
    }

    /// Bytes of input used so far, dot-stuffing included.
    pub fn consumed(&self) -> u64 {
        self.consumed
    }

    /// The message (what was not taken yet), or `None` if it passed the size limit.
    pub fn into_body(self) -> Option<Vec<u8>> {
        (!self.overflow).then_some(self.body)
    }

    /// Takes the bytes decoded so far, so that they can go to disk instead of piling up.
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// Bytes decoded so far, taken or not (meaningless once [`overflowed`](Self::overflowed)).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The start of the message (up to 64 KiB), where its header block is.
    pub fn head(&self) -> &[u8] {
        &self.head
    }
}

/// The server side of one SMTP connection, without I/O.
///
/// See the module documentation for how the connection layer drives it.
#[derive(Debug)]
pub struct Session {
    options: Arc<InboundOptions>,
    client: SocketAddr,
    relay_allowed: bool,
    max_line: usize,
    /// Received bytes; those before `start` are used up.
    input: Vec<u8>,
    start: usize,
    /// Bytes after `start` already searched for a LF.
    scanned: usize,
    /// Skipping the rest of an over-long line.
    discarding: bool,
    replies: Vec<Reply>,
    phase: Phase,
    helo: Option<Helo>,
    tls: Option<String>,
    authenticated_as: Option<String>,
    transaction: Option<Transaction>,
    errors: u32,
    auth_failures: u32,
    /// Limits across connections; a session without one only has its own.
    anvil: Option<Arc<Anvil>>,
    /// Messages whose DATA began (the current one's number while in DATA).
    messages: u64,
}

#[derive(Debug)]
enum Phase {
    Command,
    Data(BodyDecoder),
    Auth(AuthStep),
    Spooling,
    Closed,
}

#[derive(Debug)]
enum AuthStep {
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

#[derive(Debug)]
struct Helo {
    name: String,
    extended: bool,
}

#[derive(Debug)]
struct Transaction {
    from: String,
    rcpts: Vec<String>,
    requiretls: bool,
    smtputf8: bool,
}

enum Line {
    Complete(Vec<u8>),
    TooLong,
    BareLf,
}

impl Session {
    /// A session for a client connected from `client`, with the `220` greeting queued.
    pub fn new(options: Arc<InboundOptions>, client: SocketAddr) -> Self {
        let relay_allowed = options.relay_allowed(client.ip());
        let max_line = options.max_line_length.max(MIN_LINE_LENGTH);
        let greeting =
            Reply::plain(220, vec![format!("{} ESMTP Postwarden ready", options.hostname)]);
        Session {
            options,
            client,
            relay_allowed,
            max_line,
            input: Vec::new(),
            start: 0,
            scanned: 0,
            discarding: false,
            replies: vec![greeting],
            phase: Phase::Command,
            helo: None,
            tls: None,
            authenticated_as: None,
            transaction: None,
            errors: 0,
            auth_failures: 0,
            anvil: None,
            messages: 0,
        }
    }

    /// Shares the per-address limits (AUTH failures) and counters of the server's [`Anvil`].
    pub fn with_anvil(mut self, anvil: Arc<Anvil>) -> Self {
        self.anvil = Some(anvil);
        self
    }

    /// Failed AUTH attempts in this session so far (the server pauses after each).
    pub fn auth_failures(&self) -> u32 {
        self.auth_failures
    }

    /// How many messages' DATA began in this session: while in DATA, the current message's
    /// number. A connection layer that keeps something per message (a staging file) tells by
    /// it that the message it kept it for has ended, even when the next one began in the
    /// same batch of input.
    pub fn message_number(&self) -> u64 {
        self.messages
    }

    /// Bytes of the message received so far, while in DATA; `None` outside DATA.
    pub fn data_received(&self) -> Option<u64> {
        match &self.phase {
            Phase::Data(decoder) => Some(decoder.consumed()),
            _ => None,
        }
    }

    /// Adds received bytes. Call [`next_action`](Self::next_action) afterwards.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.start > 0 {
            self.input.drain(..self.start);
            self.start = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Bytes received and not yet used (at most one partial line after a
    /// [`Read`](Action::Read)).
    pub fn buffered(&self) -> usize {
        self.input.len() - self.start
    }

    /// Whether TLS is up.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The user the client logged in as.
    pub fn authenticated_as(&self) -> Option<&str> {
        self.authenticated_as.as_deref()
    }

    /// Processes buffered input up to the next thing the connection layer must do.
    pub fn next_action(&mut self) -> Action {
        loop {
            match &mut self.phase {
                Phase::Closed => return Action::Close,
                Phase::Spooling => return Action::Read,
                Phase::Data(decoder) => {
                    let used = decoder.feed(&self.input[self.start..]);
                    self.start += used;
                    if !decoder.is_done() {
                        return Action::Read;
                    }
                    if let Some(pending) = self.end_of_data() {
                        return Action::Submit(Box::new(pending));
                    }
                }
                Phase::Command | Phase::Auth(_) => {
                    let Some(line) = self.next_line() else {
                        return Action::Read;
                    };
                    if let Some(action) = self.line(line) {
                        return action;
                    }
                }
            }
        }
    }

    /// Moves the queued replies, encoded, to `out`.
    pub fn write_replies(&mut self, out: &mut Vec<u8>) {
        for reply in self.replies.drain(..) {
            reply.encode(out);
        }
    }

    /// Takes the queued replies.
    pub fn take_replies(&mut self) -> Vec<Reply> {
        std::mem::take(&mut self.replies)
    }

    /// The TLS handshake after [`Action::StartTls`] succeeded; `description` (such as the
    /// version and cipher suite) goes into `Received:` lines. The client must send EHLO
    /// again: everything learnt before TLS is forgotten (RFC 3207 §4.2).
    pub fn tls_established(&mut self, description: String) {
        self.tls = Some(description);
        self.helo = None;
        self.transaction = None;
        self.authenticated_as = None;
        self.input.clear();
        self.start = 0;
        self.scanned = 0;
        self.discarding = false;
        self.phase = Phase::Command;
    }

    /// Reports what the spool did with the last [`Action::Submit`]: `Ok(queue id)` is
    /// answered `250 2.0.0`, `Err(reason)` `451 4.3.0` (the reason is not sent).
    pub fn submitted(&mut self, result: &Result<String, String>) {
        if !matches!(self.phase, Phase::Spooling) {
            return;
        }
        self.phase = Phase::Command;
        self.reply(match result {
            Ok(id) => Reply::status(250, (2, 0, 0), format!("message accepted, queued as {id}")),
            Err(_) => Reply::status(
                451,
                (4, 3, 0),
                "message not accepted: local problem, please try again later",
            ),
        });
    }

    fn next_line(&mut self) -> Option<Line> {
        let buf = &self.input[self.start..];
        match buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let lf = self.scanned + i;
                let line = if std::mem::take(&mut self.discarding) || lf + 1 > self.max_line {
                    Line::TooLong
                } else if lf == 0 || buf[lf - 1] != b'\r' {
                    Line::BareLf
                } else {
                    Line::Complete(buf[..lf - 1].to_vec())
                };
                self.start += lf + 1;
                self.scanned = 0;
                Some(line)
            }
            None => {
                self.scanned = buf.len();
                if buf.len() >= self.max_line {
                    // No LF within the limit: the line can no longer fit. Skip to its end.
                    self.discarding = true;
                    self.input.clear();
                    self.start = 0;
                    self.scanned = 0;
                }
                None
            }
        }
    }

    fn line(&mut self, line: Line) -> Option<Action> {
        let line = match line {
            Line::Complete(line) => line,
            Line::TooLong => {
                self.phase = Phase::Command;
                return self.error(Reply::status(500, (5, 5, 6), "line too long"));
            }
            Line::BareLf => {
                self.phase = Phase::Command;
                return self.error(Reply::status(500, (5, 5, 2), "lines must end with CRLF"));
            }
        };
        match std::mem::replace(&mut self.phase, Phase::Command) {
            Phase::Auth(step) => self.auth_response(step, &line),
            _ => self.command(&line),
        }
    }

    fn reply(&mut self, reply: Reply) {
        self.replies.push(reply);
    }

    /// Queues an error reply and disconnects a client that makes too many.
    fn error(&mut self, reply: Reply) -> Option<Action> {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.options.max_errors.max(1) {
            if let Some(anvil) = &self.anvil {
                InboundStats::count(&anvil.stats.too_many_errors);
            }
            return Some(self.close(Reply::status(421, (4, 7, 0), "too many errors")));
        }
        None
    }

    fn close(&mut self, reply: Reply) -> Action {
        self.reply(reply);
        self.phase = Phase::Closed;
        Action::Close
    }

    fn command(&mut self, line: &[u8]) -> Option<Action> {
        let command = match parse_command(line) {
            Ok(command) => command,
            Err(reply) => return self.error(reply),
        };
        match command {
            Command::Ehlo(name) => {
                self.transaction = None;
                self.helo = Some(Helo { name, extended: true });
                let reply = self.ehlo_reply();
                self.reply(reply);
            }
            Command::Helo(name) => {
                self.transaction = None;
                self.helo = Some(Helo { name, extended: false });
                self.reply(Reply::plain(250, vec![self.options.hostname.clone()]));
            }
            Command::Mail { from, params } => return self.mail(from, params),
            Command::Rcpt { to } => return self.rcpt(to),
            Command::Data => return self.data(),
            Command::Rset => {
                self.transaction = None;
                self.reply(Reply::status(250, (2, 0, 0), "ok"));
            }
            Command::Noop => self.reply(Reply::status(250, (2, 0, 0), "ok")),
            Command::Quit => {
                let text = format!("{} closing connection", self.options.hostname);
                return Some(self.close(Reply::status(221, (2, 0, 0), text)));
            }
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => return self.auth(&mechanism, initial),
            Command::Vrfy => self.reply(Reply::status(252, (2, 5, 0), "cannot verify users")),
            Command::Help => self.reply(Reply::status(214, (2, 0, 0), "see RFC 5321")),
        }
        None
    }

    fn auth_offered(&self) -> bool {
        self.tls.is_some() && self.options.auth_configured()
    }

    fn ehlo_reply(&self) -> Reply {
        let name = self.helo.as_ref().map(|h| h.name.as_str()).unwrap_or("");
        let mut lines = vec![
            format!("{} greets {name}", self.options.hostname),
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.options.max_message_size),
            "8BITMIME".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "SMTPUTF8".to_owned(),
        ];
        if self.options.tls.is_some() && self.tls.is_none() {
            lines.push("STARTTLS".to_owned());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".to_owned());
        }
        if self.tls.is_some() {
            lines.push("REQUIRETLS".to_owned());
        }
        Reply::plain(250, lines)
    }

    fn mail(&mut self, from: String, params: MailParams) -> Option<Action> {
        if self.helo.is_none() {
            return self.error(Reply::status(503, (5, 5, 1), "send EHLO first"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::status(503, (5, 5, 1), "nested MAIL command"));
        }
        if params.requiretls && self.tls.is_none() {
            return self.error(Reply::status(555, (5, 5, 4), "REQUIRETLS needs TLS"));
        }
        if params.auth && !self.auth_offered() {
            return self.error(unsupported_param("AUTH"));
        }
        if params.size.is_some_and(|size| size > self.options.max_message_size as u64) {
            self.reply(Reply::status(552, (5, 3, 4), "message size exceeds the limit"));
            return None;
        }
        self.transaction = Some(Transaction {
            from,
            rcpts: Vec::new(),
            requiretls: params.requiretls,
            smtputf8: params.smtputf8,
        });
        self.reply(Reply::status(250, (2, 1, 0), "sender ok"));
        None
    }

    fn rcpt(&mut self, to: String) -> Option<Action> {
        let may_relay = self.relay_allowed || self.authenticated_as.is_some();
        let max = self.options.max_recipients;
        let Some(transaction) = self.transaction.as_mut() else {
            return self.error(Reply::status(503, (5, 5, 1), "need MAIL before RCPT"));
        };
        // A denied recipient counts as an error (Postfix's `smtpd_hard_error_limit`), so a
        // client cannot probe for ever.
        let reply = if !may_relay {
            return self.error(Reply::status(554, (5, 7, 1), "relaying denied"));
        } else if !to.is_ascii() && !transaction.smtputf8 {
            // RFC 6531 §3.4: UTF-8 addresses only in a transaction that asked for SMTPUTF8.
            Reply::status(553, (5, 6, 7), "non-ASCII address needs SMTPUTF8")
        } else if transaction.rcpts.contains(&to) {
            Reply::status(250, (2, 1, 5), "recipient ok")
        } else if transaction.rcpts.len() >= max {
            Reply::status(452, (4, 5, 3), "too many recipients")
        } else {
            transaction.rcpts.push(to);
            Reply::status(250, (2, 1, 5), "recipient ok")
        };
        self.reply(reply);
        None
    }

    fn data(&mut self) -> Option<Action> {
        match &self.transaction {
            None => self.error(Reply::status(503, (5, 5, 1), "need MAIL before DATA")),
            Some(t) if t.rcpts.is_empty() => {
                self.error(Reply::status(554, (5, 5, 1), "no valid recipients"))
            }
            Some(_) => {
                self.messages += 1;
                self.phase = Phase::Data(BodyDecoder::new(self.options.max_message_size));
                self.reply(Reply::plain(354, vec!["end data with <CR><LF>.<CR><LF>".to_owned()]));
                None
            }
        }
    }

    fn end_of_data(&mut self) -> Option<PendingSubmission> {
        let Phase::Data(decoder) = std::mem::replace(&mut self.phase, Phase::Command) else {
            return None;
        };
        let transaction = self.transaction.take()?;
        let found = decoder.findings();
        let size = decoder.size();
        let tls_required_no = tls_required_no(decoder.head());
        let Some(body) = decoder.into_body() else {
            self.reply(Reply::status(552, (5, 3, 4), "message size exceeds the limit"));
            return None;
        };
        if found.nul {
            self.reply(Reply::status(554, (5, 6, 0), "message contains NUL characters"));
            return None;
        }
        if self.options.bare_newline == BareNewline::Reject && (found.bare_lf || found.bare_cr) {
            self.reply(Reply::status(
                550,
                (5, 5, 2),
                "message contains a bare CR or LF; lines must end with CRLF",
            ));
            return None;
        }
        self.phase = Phase::Spooling;
        Some(PendingSubmission {
            number: self.messages,
            tls_required_no,
            mail_from: transaction.from,
            rcpts: transaction.rcpts,
            body,
            size,
            requiretls: transaction.requiretls,
            smtputf8: transaction.smtputf8,
            trace: self.trace(),
        })
    }

    fn trace(&self) -> Trace {
        let helo = self.helo.as_ref();
        Trace {
            client: self.client,
            helo: helo.map(|h| h.name.clone()).unwrap_or_default(),
            extended: helo.is_some_and(|h| h.extended),
            hostname: self.options.hostname.clone(),
            tls: self.tls.clone(),
            authenticated_as: self.authenticated_as.clone(),
        }
    }

    /// In DATA: the `Received:` line for the message being received, dated `at`. A
    /// connection layer that writes the message to disk as it arrives writes this first
    /// (Postfix too dates it before the message is complete).
    pub fn received_header(&self, at: SystemTime) -> Option<String> {
        match (&self.phase, &self.transaction) {
            (Phase::Data(_), Some(t)) => {
                Some(received_header(&self.trace(), &t.rcpts, t.smtputf8, at))
            }
            _ => None,
        }
    }

    /// In DATA: takes the bytes of the message decoded so far (see
    /// [`BodyDecoder::take_body`]). Outside DATA: nothing.
    pub fn take_body(&mut self) -> Vec<u8> {
        match &mut self.phase {
            Phase::Data(decoder) => decoder.take_body(),
            _ => Vec::new(),
        }
    }

    fn starttls(&mut self) -> Option<Action> {
        if self.options.tls.is_none() {
            return self.error(Reply::status(502, (5, 5, 1), "STARTTLS not available"));
        }
        if self.tls.is_some() {
            return self.error(Reply::status(503, (5, 5, 1), "TLS already active"));
        }
        if self.helo.is_none() {
            return self.error(Reply::status(503, (5, 5, 1), "send EHLO first"));
        }
        self.reply(Reply::status(220, (2, 0, 0), "ready to start TLS"));
        let discarded = self.buffered();
        self.input.clear();
        self.start = 0;
        self.scanned = 0;
        self.transaction = None;
        Some(Action::StartTls { discarded })
    }

    fn auth(&mut self, mechanism: &str, initial: Option<String>) -> Option<Action> {
        if !self.options.auth_configured() {
            return self.error(Reply::status(502, (5, 5, 1), "AUTH not available"));
        }
        if self.tls.is_none() {
            return self.error(Reply::status(
                530,
                (5, 7, 0),
                "must issue a STARTTLS command first",
            ));
        }
        if self.helo.is_none() {
            return self.error(Reply::status(503, (5, 5, 1), "send EHLO first"));
        }
        if self.authenticated_as.is_some() {
            return self.error(Reply::status(503, (5, 5, 1), "already authenticated"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::status(
                503,
                (5, 5, 1),
                "AUTH not allowed during a transaction",
            ));
        }
        if self.auth_refused() {
            return self.error(auth_refused_reply());
        }
        match (mechanism, initial) {
            ("PLAIN", None) => {
                self.phase = Phase::Auth(AuthStep::Plain);
                self.reply(Reply::plain(334, vec![String::new()]));
                None
            }
            ("PLAIN", Some(response)) => self.auth_response(AuthStep::Plain, response.as_bytes()),
            ("LOGIN", None) => {
                self.phase = Phase::Auth(AuthStep::LoginUser);
                self.reply(Reply::plain(334, vec![base64_encode(b"Username:")]));
                None
            }
            ("LOGIN", Some(response)) => {
                self.auth_response(AuthStep::LoginUser, response.as_bytes())
            }
            _ => self.error(Reply::status(504, (5, 5, 4), "mechanism not supported")),
        }
    }

    /// One client response in an AUTH exchange (RFC 4954 §4): `*` cancels, `=` is empty.
    fn auth_response(&mut self, step: AuthStep, line: &[u8]) -> Option<Action> {
        if line == b"*" {
            return self.error(Reply::status(501, (5, 7, 0), "authentication cancelled"));
        }
        let decoded = match line {
            b"=" => Some(Vec::new()),
            _ => std::str::from_utf8(line).ok().and_then(base64_decode),
        };
        let Some(decoded) = decoded.and_then(|d| String::from_utf8(d).ok()) else {
            return self.error(Reply::status(501, (5, 5, 2), "invalid base64 response"));
        };
        match step {
            AuthStep::Plain => {
                let mut parts = decoded.split('\0');
                let (Some(authzid), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return self.error(Reply::status(501, (5, 5, 2), "malformed PLAIN response"));
                };
                // Logging in as someone else (a proxy authorisation) is not supported.
                let proxy = !authzid.is_empty() && authzid != user;
                self.check_credentials(user, password, !proxy)
            }
            AuthStep::LoginUser => {
                self.phase = Phase::Auth(AuthStep::LoginPassword { user: decoded });
                self.reply(Reply::plain(334, vec![base64_encode(b"Password:")]));
                None
            }
            AuthStep::LoginPassword { user } => self.check_credentials(&user, &decoded, true),
        }
    }

    /// Whether AUTH from this client's address is refused for now (counted when it is).
    fn auth_refused(&self) -> bool {
        let Some(anvil) = &self.anvil else { return false };
        let refused = anvil.auth_refused(self.client.ip(), &self.options, Instant::now());
        if refused {
            InboundStats::count(&anvil.stats.auth_refused);
        }
        refused
    }

    fn check_credentials(&mut self, user: &str, password: &str, allowed: bool) -> Option<Action> {
        // Other connections from the address may have used up its failures meanwhile: then
        // not even the right password is checked.
        if self.auth_refused() {
            return self.error(auth_refused_reply());
        }
        let hash = self.options.credentials.get(user).map(String::as_str);
        let matches = verify_password(hash.unwrap_or(DUMMY_HASH), password);
        // Logged either way, as Postfix's `sasl_username=` and "authentication failed" lines
        // are: what fail2ban-style tools and an operator chasing a submitter look for. The
        // user name comes from the client, so it is logged escaped; the password never is.
        if allowed && hash.is_some() && matches {
            tracing::info!(user = ?user, "authentication succeeded");
            self.authenticated_as = Some(user.to_owned());
            self.reply(Reply::status(235, (2, 7, 0), "authentication successful"));
            return None;
        }
        self.reply(Reply::status(535, (5, 7, 8), "authentication credentials invalid"));
        self.auth_failures += 1;
        tracing::warn!(user = ?user, failures = self.auth_failures, "authentication failed");
        if let Some(anvil) = &self.anvil {
            anvil.auth_failed(self.client.ip(), &self.options, Instant::now());
        }
        if self.auth_failures >= MAX_AUTH_FAILURES {
            return Some(self.close(Reply::status(
                421,
                (4, 7, 0),
                "too many authentication failures",
            )));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::{DotStuffer, ReplyBuffer};
    use proptest::prelude::*;

    fn options() -> Arc<InboundOptions> {
        Arc::new(InboundOptions { hostname: "relay.test".into(), ..Default::default() })
    }

    /// Regression (fuzz/session, crash-b5620092…): an unknown MAIL parameter of 500+ bytes was
    /// echoed into a 516-byte `555` line; every reply line stays within 512 octets with CRLF.
    #[test]
    fn a_long_unknown_parameter_cannot_make_an_overlong_reply_line() {
        let long = "B".repeat(600);
        let input = format!("EHLO c.test\r\nMAIL FROM:<a@b.test> {long}=1\r\n");
        let (replies, _) = run(options(), local(), input.as_bytes());
        let last = replies.last().unwrap();
        assert_eq!(last.code(), 555, "{last}");
        let mut wire = Vec::new();
        last.encode(&mut wire);
        assert_eq!(wire.len(), MAX_REPLY_LINE, "{last}");
        assert!(wire.ends_with(b"...\r\n"), "{last}");
        let mut short = Vec::new();
        Reply::status(250, (2, 0, 0), "ok").encode(&mut short);
        assert_eq!(short, b"250 2.0.0 ok\r\n");
    }

    fn local() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    /// Runs `input` through a fresh session; spool calls succeed with id `Q1`.
    fn run(
        options: Arc<InboundOptions>,
        client: SocketAddr,
        input: &[u8],
    ) -> (Vec<Reply>, Vec<Submission>) {
        let mut session = Session::new(options, client);
        session.receive(input);
        let mut submissions = Vec::new();
        loop {
            match session.next_action() {
                Action::Read | Action::Close => break,
                Action::StartTls { .. } => break,
                Action::Submit(pending) => {
                    submissions.push(pending.into_submission(UNIX_EPOCH));
                    session.submitted(&Ok("Q1".into()));
                }
            }
        }
        (session.take_replies(), submissions)
    }

    fn codes(replies: &[Reply]) -> Vec<String> {
        replies
            .iter()
            .map(|r| match r.enhanced() {
                Some(e) => format!("{} {e}", r.code()),
                None => r.code().to_string(),
            })
            .collect()
    }

    #[test]
    fn parses_commands_case_insensitively() {
        assert_eq!(parse_command(b"ehlo client.test"), Ok(Command::Ehlo("client.test".into())));
        assert_eq!(parse_command(b"QuIt"), Ok(Command::Quit));
        assert_eq!(
            parse_command(b"mail from:<a@b.test> size=10 body=8bitmime requiretls"),
            Ok(Command::Mail {
                from: "a@b.test".into(),
                params: MailParams {
                    size: Some(10),
                    body_8bit: true,
                    requiretls: true,
                    auth: false,
                    smtputf8: false,
                }
            })
        );
        assert_eq!(
            parse_command(b"MAIL FROM: <>"),
            Ok(Command::Mail { from: String::new(), params: MailParams::default() })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<@hop.test,@two.test:\"x y\"@b.test>"),
            Ok(Command::Rcpt { to: "\"x y\"@b.test".into() })
        );
        assert_eq!(
            parse_command(b"AUTH plain AHVAAHA="),
            Ok(Command::Auth { mechanism: "PLAIN".into(), initial: Some("AHVAAHA=".into()) })
        );
    }

    #[test]
    fn refuses_bad_commands_with_the_right_codes() {
        let code = |line: &[u8]| {
            let r = parse_command(line).unwrap_err();
            format!("{} {}", r.code(), r.enhanced().unwrap())
        };
        assert_eq!(code(b"FOO"), "500 5.5.1");
        assert_eq!(code(b"MAIL FROM:<a@b.test> FOO=1"), "555 5.5.4");
        assert_eq!(code(b"MAIL FROM:<a@b.test> SMTPUTF8=yes"), "501 5.5.4");
        assert_eq!(code(b"MAIL FROM:<a@b.test> BODY=BINARYMIME"), "555 5.5.4");
        assert_eq!(code(b"MAIL FROM:<a@b.test> SIZE=1 SIZE=2"), "501 5.5.4");
        assert_eq!(code(b"MAIL FROM:<a@b.test> SIZE=x"), "501 5.5.4");
        assert_eq!(code(b"RCPT TO:<a@b.test> NOTIFY=NEVER"), "555 5.5.4");
        assert_eq!(code(b"MAIL FROM:a@b.test"), "501 5.1.7");
        assert_eq!(code(b"RCPT TO:<>"), "501 5.1.3");
        assert_eq!(code(b"RCPT TO:<postmaster>"), "501 5.1.3");
        assert_eq!(code(b"RCPT TO:<a@b..test>"), "501 5.1.3");
        // RFC 6531: UTF-8 in addresses, with SMTPUTF8 (a recipient is judged by the session
        // against its transaction); never in parameters or other commands; never invalid UTF-8.
        assert_eq!(code("MAIL FROM:<é@b.test>".as_bytes()), "553 5.6.7");
        assert_eq!(
            parse_command("MAIL FROM:<jörg@bücher.test> SMTPUTF8".as_bytes()),
            Ok(Command::Mail {
                from: "jörg@bücher.test".into(),
                params: MailParams { smtputf8: true, ..MailParams::default() }
            })
        );
        assert_eq!(
            parse_command("RCPT TO:<用户@例子.测试>".as_bytes()),
            Ok(Command::Rcpt { to: "用户@例子.测试".into() })
        );
        assert_eq!(code(b"RCPT TO:<\xc3@b.test>"), "553 5.6.7");
        assert_eq!(code("RCPT TO:<a@b.test> X=é".as_bytes()), "501 5.5.4");
        assert_eq!(code("NOOP é".as_bytes()), "501 5.5.4");
        assert_eq!(code("RCPT TO:<a\u{85}b@b.test>".as_bytes()), "501 5.5.4");
        assert_eq!(code(b"DATA now"), "501 5.5.4");
        assert_eq!(code(b"EHLO"), "501 5.5.4");
        assert_eq!(code(b"EHLO a b"), "501 5.5.4");
        assert_eq!(code(b"MAIL FROM:<a@b.test>\rRCPT"), "501 5.5.4");
    }

    #[test]
    fn normal_transaction() {
        let (replies, subs) = run(
            options(),
            local(),
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nSubject: hi\r\n\r\n..dot\r\n.\r\nQUIT\r\n",
        );
        assert_eq!(
            codes(&replies),
            ["220", "250", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0", "221 2.0.0"]
        );
        assert_eq!(subs.len(), 1);
        let body = String::from_utf8(subs[0].body.clone()).unwrap();
        assert!(body.starts_with("Received: from c.test ([127.0.0.1])\r\n\tby relay.test with ESMTP\r\n\tfor <x@y.test>;\r\n\tThu, 1 Jan 1970 00:00:00 +0000\r\n"), "{body}");
        assert!(body.ends_with("Subject: hi\r\n\r\n.dot\r\n"));
    }

    #[test]
    fn ehlo_lists_extensions_without_tls() {
        let (replies, _) = run(options(), local(), b"EHLO c.test\r\n");
        assert_eq!(
            replies[1].lines(),
            [
                "relay.test greets c.test",
                "PIPELINING",
                "SIZE 26214400",
                "8BITMIME",
                "ENHANCEDSTATUSCODES",
                "SMTPUTF8"
            ]
        );
        assert_eq!(
            replies[1].to_string(),
            "250-relay.test greets c.test\r\n250-PIPELINING\r\n250-SIZE 26214400\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8"
        );
    }

    /// RFC 6531 §3.4: a UTF-8 recipient only in a transaction that asked for SMTPUTF8; the
    /// message carries the flag, and its `Received:` line says `UTF8SMTP` (§3.7.3).
    #[test]
    fn utf8_addresses_need_smtputf8() {
        let (replies, subs) = run(
            options(),
            local(),
            "EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<jörg@bücher.test>\r\nRSET\r\n\
             MAIL FROM:<a@b.test> SMTPUTF8\r\nRCPT TO:<jörg@bücher.test>\r\nDATA\r\n\
             Subject: grüße\r\n\r\nhi\r\n.\r\n"
                .as_bytes(),
        );
        assert_eq!(
            codes(&replies),
            [
                "220",
                "250",
                "250 2.1.0",
                "553 5.6.7",
                "250 2.0.0",
                "250 2.1.0",
                "250 2.1.5",
                "354",
                "250 2.0.0"
            ]
        );
        assert_eq!(subs.len(), 1);
        assert!(subs[0].smtputf8);
        assert_eq!(subs[0].rcpts, ["jörg@bücher.test"]);
        let body = String::from_utf8(subs[0].body.clone()).unwrap();
        assert!(body.contains("by relay.test with UTF8SMTP\r\n"), "{body}");
    }

    #[test]
    fn sequence_errors() {
        let (replies, _) = run(
            options(),
            local(),
            b"MAIL FROM:<a@b.test>\r\nHELO c.test\r\nRCPT TO:<x@y.test>\r\nDATA\r\nMAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\nDATA\r\n",
        );
        assert_eq!(
            codes(&replies),
            [
                "220",
                "503 5.5.1",
                "250",
                "503 5.5.1",
                "503 5.5.1",
                "250 2.1.0",
                "503 5.5.1",
                "554 5.5.1"
            ]
        );
    }

    #[test]
    fn relay_control_and_limits() {
        let stranger: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let (replies, _) = run(
            options(),
            stranger,
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n",
        );
        assert_eq!(codes(&replies)[3], "554 5.7.1");
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:1".parse().unwrap();
        let (replies, _) = run(
            options(),
            mapped,
            b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n",
        );
        assert_eq!(codes(&replies)[3], "250 2.1.5");

        let opts = Arc::new(InboundOptions {
            max_recipients: 2,
            max_message_size: 10,
            ..Default::default()
        });
        let (replies, _) = run(
            opts.clone(),
            local(),
            b"EHLO c.test\r\nMAIL FROM:<a@b.test> SIZE=11\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<1@y.test>\r\nRCPT TO:<1@y.test>\r\nRCPT TO:<2@y.test>\r\nRCPT TO:<3@y.test>\r\nDATA\r\n0123456789\r\n.\r\nRSET\r\n",
        );
        assert_eq!(
            codes(&replies),
            [
                "220",
                "250",
                "552 5.3.4",
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "250 2.1.5",
                "452 4.5.3",
                "354",
                "552 5.3.4",
                "250 2.0.0"
            ]
        );
    }

    #[test]
    fn requiretls_and_auth_need_tls() {
        let opts = Arc::new(InboundOptions {
            credentials: [("u".to_owned(), crate::inbound::hash_password(b"s", "p"))].into(),
            ..Default::default()
        });
        let (replies, _) = run(
            opts,
            local(),
            b"EHLO c.test\r\nMAIL FROM:<a@b.test> REQUIRETLS\r\nAUTH PLAIN AHUAcA==\r\nSTARTTLS\r\n",
        );
        // No TLS configured: AUTH is not offered at all, nor STARTTLS.
        assert_eq!(codes(&replies), ["220", "250", "555 5.5.4", "502 5.5.1", "502 5.5.1"]);
    }

    #[test]
    fn long_lines_and_bare_lf() {
        let mut input = b"EHLO c.test\r\nNOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 5000));
        input.extend_from_slice(b"\r\nNOOP\nNOOP\r\n");
        let (replies, _) = run(options(), local(), &input);
        assert_eq!(codes(&replies), ["220", "250", "500 5.5.6", "500 5.5.2", "250 2.0.0"]);

        // Exactly 1000 octets with CRLF is accepted, 1001 is not.
        let line = |n: usize| {
            let mut l = b"NOOP ".to_vec();
            l.extend(std::iter::repeat_n(b'x', n - 7));
            l.extend_from_slice(b"\r\n");
            l
        };
        let (replies, _) = run(options(), local(), &[line(1000), line(1001)].concat());
        assert_eq!(codes(&replies), ["220", "250 2.0.0", "500 5.5.6"]);
    }

    #[test]
    fn too_many_errors_disconnects() {
        let (replies, _) = run(options(), local(), &b"BOGUS\r\n".repeat(30));
        assert_eq!(replies.len(), 1 + 20 + 1);
        assert_eq!(codes(&replies).last().unwrap(), "421 4.7.0");
    }

    #[test]
    fn detects_tls_required_no() {
        assert!(tls_required_no(b"Subject: x\r\nTLS-Required: No\r\n\r\nbody"));
        assert!(tls_required_no(b"tls-required:   no  \r\n\r\n"));
        assert!(tls_required_no(b"TLS-Required:\r\n  No\r\n\r\n"));
        assert!(!tls_required_no(b"TLS-Required: Yes\r\n\r\n"));
        assert!(!tls_required_no(b"Subject: x\r\n\r\nTLS-Required: No\r\n"));
        assert!(!tls_required_no(b"X-TLS-Required: No\r\n\r\n"));
        assert!(!tls_required_no(b""));
    }

    #[test]
    fn body_end_and_unstuffing() {
        let decode = |input: &[u8]| {
            let mut d = BodyDecoder::new(1000);
            let used = d.feed(input);
            (d.is_done(), used, d.into_body().unwrap())
        };
        assert_eq!(decode(b".\r\n"), (true, 3, b"".to_vec()));
        assert_eq!(decode(b"a\r\n.\r\nQUIT\r\n"), (true, 6, b"a\r\n".to_vec()));
        assert_eq!(decode(b"..a\r\n.\r\n"), (true, 8, b".a\r\n".to_vec()));
        // Bare LF and bare CR never end the data (SMTP smuggling).
        assert_eq!(decode(b"a\n.\n"), (false, 4, b"a\n.\n".to_vec()));
        assert_eq!(decode(b"a\n.\r\n"), (false, 5, b"a\n.\r\n".to_vec()));
        assert_eq!(decode(b"a\r.\r\n"), (false, 5, b"a\r.\r\n".to_vec()));
        assert_eq!(decode(b".\rx\r\n.\r\n"), (true, 8, b"\rx\r\n".to_vec()));
    }

    /// Parses `line`; when it is an accepted MAIL or RCPT, encodes the address with the
    /// client's encoder, parses that again and checks the address came back unchanged.
    fn round_trip(line: &[u8]) -> Result<Option<String>, proptest::test_runner::TestCaseError> {
        use crate::smtp::Command as Out;
        let (address, out) = match parse_command(line) {
            Ok(Command::Mail { from, .. }) => (
                from.clone(),
                Out::Mail {
                    from,
                    size: Some(10),
                    body_8bit: false,
                    requiretls: false,
                    smtputf8: false,
                },
            ),
            Ok(Command::Rcpt { to }) => (to.clone(), Out::Rcpt { to }),
            _ => return Ok(None),
        };
        let mut wire = Vec::new();
        let encoded = out.encode(&mut wire);
        prop_assert!(
            encoded.is_ok(),
            "{:?} accepted inbound, refused outbound: {:?}",
            address,
            encoded
        );
        let again = parse_command(wire.strip_suffix(b"\r\n").unwrap_or(&wire));
        let back = match again {
            Ok(Command::Mail { from, .. }) => from,
            Ok(Command::Rcpt { to }) => to,
            other => return Err(proptest::test_runner::TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(&back, &address);
        Ok(Some(address))
    }

    #[test]
    fn body_findings() {
        let found = |input: &[u8]| {
            let mut d = BodyDecoder::new(1000);
            d.feed(input);
            let f = d.findings();
            (f.nul, f.bare_lf, f.bare_cr)
        };
        assert_eq!(found(b"a\r\nb\r\n.\r\n"), (false, false, false));
        assert_eq!(found(b"a\nb\r\n.\r\n"), (false, true, false));
        assert_eq!(found(b"\n\r\n.\r\n"), (false, true, false));
        assert_eq!(found(b".\nx\r\n.\r\n"), (false, true, false));
        assert_eq!(found(b"a\rb\r\n.\r\n"), (false, false, true));
        assert_eq!(found(b".\rx\r\n.\r\n"), (false, false, true));
        assert_eq!(found(b"a\r\r\n.\r\n"), (false, false, true));
        assert_eq!(found(b"a\0\r\n.\r\n"), (true, false, false));
        assert_eq!(found(b"\0\r\n.\r\n"), (true, false, false));
        assert_eq!(found(b"a\r\0\r\n.\r\n"), (true, false, true));
        // What follows the end of the data is not the message's.
        assert_eq!(found(b"a\r\n.\r\n\0\n"), (false, false, false));
    }

    #[test]
    fn dates() {
        let at = |s: u64| rfc5322_date(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(at(1_751_362_200), "Tue, 1 Jul 2025 09:30:00 +0000");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parse_command_never_panics(line in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_command(&line);
        }

        /// Issue 10 item 5: whatever address the relay accepts at MAIL or RCPT, its client
        /// side can send on (a refusal there used to abort the whole transaction), and the
        /// server reading what it sends gets the same address back.
        #[test]
        fn what_inbound_accepts_outbound_sends_unchanged(
            verb in "(?i)(mail from:|rcpt to:) ?",
            local in "\"[ <>@\"\\\\a-z.]{0,8}\"|[a-z.<>!#%+=\"\\\\]{1,8}",
            domain in "[a-z0-9.-]{1,10}|\\[[0-9a-z.:<>@\\[-]{1,10}\\]",
            tail in "[ <>@a-z]{0,4}",
        ) {
            round_trip(format!("{verb}<{local}@{domain}>{tail}").as_bytes())?;
        }

        /// RFC 5321 §4.1.2 quoted strings: every `Quoted-string = DQUOTE *QcontentSMTP DQUOTE`
        /// (qtextSMTP: printable ASCII but `"` and `\`; quoted-pairSMTP: `\` and any printable
        /// ASCII) is accepted, sent as it came, and read back the same.
        #[test]
        fn quoted_local_parts_round_trip(
            content in proptest::collection::vec(
                prop_oneof![
                    proptest::char::range(' ', '~').prop_filter("qtext", |c| *c != '"' && *c != '\\').prop_map(String::from),
                    proptest::char::range(' ', '~').prop_map(|c| format!("\\{c}")),
                ],
                0..20,
            ),
            sender in any::<bool>(),
        ) {
            let address = format!("\"{}\"@example.test", content.concat());
            let line = match sender {
                true => format!("MAIL FROM:<{address}>"),
                false => format!("RCPT TO:<{address}>"),
            };
            let got = round_trip(line.as_bytes())?;
            prop_assert_eq!(got, Some(address));
        }

        #[test]
        fn parse_command_never_panics_on_commandish(line in "(?i)(mail from:|rcpt to:|ehlo |auth |data|starttls)[ <>@\"\\\\.a-z0-9=:,\\[\\]-]{0,80}") {
            let _ = parse_command(line.as_bytes());
        }

        /// Arbitrary bytes, split arbitrarily: no panic, the buffer stays bounded, every
        /// reply is one the relay's own client-side parser accepts.
        #[test]
        fn session_survives_arbitrary_input(
            chunks in proptest::collection::vec(
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..200),
                    proptest::sample::select(vec![
                        b"EHLO c.test\r\n".to_vec(), b"MAIL FROM:<a@b.test>\r\n".to_vec(),
                        b"RCPT TO:<x@y.test>\r\n".to_vec(), b"DATA\r\n".to_vec(),
                        b"\r\n.\r\n".to_vec(), b"AUTH LOGIN\r\n".to_vec(), b"..\r\n".to_vec(),
                    ]),
                ],
                0..40,
            )
        ) {
            let opts = Arc::new(InboundOptions { max_message_size: 300, ..Default::default() });
            let mut session = Session::new(opts, local());
            let mut wire = Vec::new();
            'outer: for chunk in &chunks {
                session.receive(chunk);
                loop {
                    match session.next_action() {
                        Action::Read => break,
                        Action::Close | Action::StartTls { .. } => break 'outer,
                        Action::Submit(p) => {
                            prop_assert!(p.size() <= 300);
                            session.submitted(&Err("no".into()));
                        }
                    }
                }
                prop_assert!(session.buffered() <= 1000, "buffered {}", session.buffered());
            }
            session.write_replies(&mut wire);
            let mut parser = ReplyBuffer::new();
            parser.extend(&wire).unwrap();
            while parser.pending() > 0 {
                prop_assert!(parser.next_reply().unwrap().is_some());
            }
        }

        /// The relay's own dot-stuffer and this decoder are inverses, however the stuffed
        /// bytes are split.
        #[test]
        fn unstuffing_inverts_stuffing(
            lines in proptest::collection::vec("[.a ]{0,4}", 0..12),
            split in any::<proptest::sample::Index>(),
        ) {
            let message: Vec<u8> =
                lines.iter().flat_map(|l| [l.as_bytes(), b"\r\n"].concat()).collect();
            let mut stuffed = Vec::new();
            let mut stuffer = DotStuffer::new();
            stuffer.encode(&message, &mut stuffed);
            stuffer.finish(&mut stuffed);
            let at = split.index(stuffed.len() + 1);
            let mut d = BodyDecoder::new(usize::MAX);
            let first = d.feed(&stuffed[..at]);
            prop_assert_eq!(first, at);
            let second = d.feed(&stuffed[at..]);
            prop_assert!(d.is_done());
            prop_assert_eq!(first + second, stuffed.len());
            prop_assert_eq!(d.into_body().unwrap(), message);
        }

        /// Where the input is split never changes what is decoded or where it ends.
        #[test]
        fn decoding_ignores_chunk_boundaries(
            input in proptest::collection::vec(
                prop_oneof![Just(b'.'), Just(b'\r'), Just(b'\n'), Just(b'a'), Just(0u8)], 0..64),
            split in any::<proptest::sample::Index>(),
            max in 0usize..40,
        ) {
            let mut whole = BodyDecoder::new(max);
            let used = whole.feed(&input);
            let at = split.index(input.len() + 1);
            let mut parts = BodyDecoder::new(max);
            let mut used_parts = parts.feed(&input[..at]);
            if !parts.is_done() {
                used_parts += parts.feed(&input[at..]);
            }
            prop_assert_eq!(used, used_parts);
            prop_assert_eq!(whole.is_done(), parts.is_done());
            prop_assert_eq!(whole.overflowed(), parts.overflowed());
            prop_assert_eq!(whole.findings(), parts.findings());
            if !whole.overflowed() {
                prop_assert_eq!(whole.size(), parts.size());
            }
            prop_assert_eq!(whole.into_body(), parts.into_body());
        }
    }
}
