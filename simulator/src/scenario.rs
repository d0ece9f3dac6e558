//! The scenario catalogue as data (research `starttls-scenarios.md` §2 and §3).
//!
//! A [`Scenario`] names a destination domain `<label>.sim.test`, the MX hosts behind it, how
//! each host behaves ([`Behaviour`]: raw reply text per SMTP stage, the STARTTLS switch, the
//! certificate, faults) and what a relay must do under each policy ([`Expected`]). The server
//! plays a behaviour; the conformance runner compares the relay's result with `expected` and
//! runs [`crate::invariants::check`] over the transcript.
//!
//! Team decisions applied (research §7): after a failed handshake, O reconnects at once in
//! plaintext to the same MX (`PlainReconnect`) when it is the only one, and with several MX
//! hosts tries TLS at the others first, falling back to plaintext at the most preferred only
//! when none delivers over TLS (issue 10 item 8); any refusal of STARTTLS under F/FV defers with
//! 4.7.4; a 5xx greeting defers; FV matches the MX host name; no revocation checking; F sends
//! STARTTLS even when it is not advertised; STARTTLS is recognised on any EHLO line.
//!
//! Recipients: a runner may use any local part, except where an outcome is
//! [`Outcome::Split`], whose entries name the local parts to use.

use std::borrow::Cow;
use std::fmt;

use crate::certs::{CertKind, ClientAuth, KxGroups, TlsKnobs, TlsVersions};
use crate::sts::StsKnobs;

/// The DNS zone every scenario domain lives in.
pub const ZONE: &str = "sim.test";

/// Reply text: mostly literals, sometimes built at start-up (a 10,000-line EHLO).
///
/// Two placeholders are substituted per connection: `{host}` (the MX host name) and `{nonce}`
/// (unique per connection; the queue id is `Q-{nonce}`, the post-TLS EHLO lists
/// `X-REAL-{nonce}`, so a relay's report can be traced to the real server, research §3.2).
pub type Text = Cow<'static, str>;

/// What the server does at one stage of the dialogue. Text is written raw: malformed replies
/// are part of the catalogue.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Act {
    /// Write the text in one write (one TCP segment on loopback).
    Reply(Text),
    /// Write each part separately, pausing [`crate::server::Timing::pause`] in between.
    Split(Vec<Text>),
    /// Write the text one byte at a time, [`crate::server::Timing::drip`] apart.
    Drip(Text),
    /// Wait [`crate::server::Timing::delay`], then write the text.
    Delay(Text),
    /// Write the text, then close (TLS close_notify first when inside TLS).
    ReplyClose(Text),
    /// Close without replying (close_notify first when inside TLS).
    Close,
    /// Close the TCP connection without a TLS close_notify (a FIN only).
    Hangup,
    /// Reset the connection (RST, via `SO_LINGER` 0).
    Reset,
    /// Say nothing for [`crate::server::Timing::tarpit`], then close.
    Tarpit,
    /// Say nothing until the client closes (at most [`crate::server::Timing::tarpit`]): the
    /// transcript's `Closed` then marks the moment the client gave up (EOD-07).
    Hold,
}

impl Act {
    /// A one-write reply from a literal.
    pub const fn reply(text: &'static str) -> Self {
        Self::Reply(Cow::Borrowed(text))
    }

    /// The reply text, if this act sends one.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Self::Reply(t) | Self::Drip(t) | Self::Delay(t) | Self::ReplyClose(t) => {
                Some(Cow::Borrowed(t.as_ref()))
            }
            Self::Split(parts) => Some(Cow::Owned(parts.concat())),
            Self::Close | Self::Hangup | Self::Reset | Self::Tarpit | Self::Hold => None,
        }
    }

    /// Whether the act sends a positive completion reply (first digit 2, RFC 5321 §4.2.1).
    pub fn is_positive(&self) -> bool {
        self.text().is_some_and(|t| t.starts_with('2'))
    }
}

/// What happens after a positive reply to STARTTLS.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Upgrade {
    /// No TLS: the dialogue goes on in plaintext (a ClientHello is then logged and answered
    /// with a plaintext 500).
    Stay,
    /// A real rustls handshake with this certificate and these knobs.
    Tls {
        /// The certificate served, issued for the MX host name.
        cert: CertKind,
        /// Protocol versions, groups, record size, client-auth and SNI knobs.
        knobs: TlsKnobs,
    },
    /// A raw-socket responder plays a TLS failure rustls cannot (research §1.3).
    Raw(Responder),
}

/// Raw-socket TLS responders: each reads the ClientHello record first (so closing does not
/// turn into an RST), then writes canned bytes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Responder {
    /// A fatal alert with this description (40 handshake_failure, 70 protocol_version).
    Alert(u8),
    /// A TLS 1.0 ServerHello choosing RC4-SHA (a legacy-only server).
    LegacyHello,
    /// A TLS 1.2 ServerHello choosing a suite the client never offers (RC4-SHA).
    UnofferedSuite,
    /// Plaintext instead of a ServerHello (the server never switched).
    Plaintext(Text),
    /// Nothing: hold the connection for the tarpit time, then close.
    Silence,
}

/// What the server does with the DATA body after its 354.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub enum BodyAct {
    /// Read the body to the final dot.
    #[default]
    Read,
    /// Close as soon as the first body line arrives (DATA-03).
    CloseMidway,
}

/// How one MX host behaves, stage by stage.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Behaviour {
    /// On connect.
    pub greeting: Act,
    /// Reply to EHLO before TLS.
    pub ehlo: Act,
    /// Reply to HELO (both phases).
    pub helo: Act,
    /// Reply to STARTTLS (injection scenarios append forged replies here).
    pub starttls: Act,
    /// What follows a positive STARTTLS reply.
    pub upgrade: Upgrade,
    /// Written once the ClientHello has arrived, before the ServerHello (INJ-03): forged
    /// replies that can only reach the client's TLS layer.
    pub inject_before_server_hello: Option<Text>,
    /// Written right after the handshake, unasked (HS-13: a second greeting).
    pub tls_banner: Option<Text>,
    /// Send a TLS 1.3 KeyUpdate before every reply inside TLS (HS-14).
    pub key_update: bool,
    /// Reply to EHLO inside TLS.
    pub ehlo_tls: Act,
    /// Reply to MAIL (once EHLO/HELO was seen in the current phase; otherwise 503).
    pub mail: Act,
    /// Reply to RCPT, unless a rule in `rcpt_rules` matches the local part.
    pub rcpt: Act,
    /// Per-recipient replies by lower-cased local part (RCPT-03).
    pub rcpt_rules: Vec<(&'static str, Act)>,
    /// Answer `452 4.5.3` once this many recipients were accepted in a transaction (RCPT-04).
    pub rcpt_limit: Option<usize>,
    /// Reply to DATA (when a recipient was accepted).
    pub data: Act,
    /// Handling of the body after 354.
    pub body: BodyAct,
    /// Reply to the final dot; a positive one records [`crate::transcript::Event::MessageAccepted`].
    pub dot: Act,
    /// Reply to QUIT; the connection closes afterwards in any case.
    pub quit: Act,
}

/// The greeting of every well-behaved fake server.
pub const GREETING: &str = "220 {host} ESMTP Postwarden simulator\r\n";
/// EHLO reply offering STARTTLS.
pub const EHLO_OFFER: &str =
    "250-{host}\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-8BITMIME\r\n250 STARTTLS\r\n";
/// EHLO reply without STARTTLS.
pub const EHLO_PLAIN: &str =
    "250-{host}\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250 8BITMIME\r\n";
/// EHLO reply inside TLS: no STARTTLS, plus a per-connection marker.
pub const EHLO_TLS: &str =
    "250-{host}\r\n250-X-REAL-{nonce}\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250 8BITMIME\r\n";
/// The go-ahead to STARTTLS.
pub const STARTTLS_GO: &str = "220 2.0.0 Ready to start TLS\r\n";
/// What a server without STARTTLS answers to it.
pub const STARTTLS_UNKNOWN: &str = "502 5.5.1 Error: command not implemented\r\n";
/// EHLO reply inside TLS without PIPELINING: the client must go in lock-step.
pub const EHLO_TLS_LOCKSTEP: &str =
    "250-{host}\r\n250-X-REAL-{nonce}\r\n250-SIZE 10485760\r\n250 8BITMIME\r\n";
/// EHLO reply inside TLS advertising REQUIRETLS (RFC 8689 §3).
pub const EHLO_TLS_REQUIRETLS: &str = "250-{host}\r\n250-X-REAL-{nonce}\r\n250-PIPELINING\r\n250-REQUIRETLS\r\n250-SIZE 10485760\r\n250 8BITMIME\r\n";
/// EHLO reply inside TLS advertising SMTPUTF8 (RFC 6531 §3.1).
pub const EHLO_TLS_SMTPUTF8: &str = "250-{host}\r\n250-X-REAL-{nonce}\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n";
/// Positive reply to the final dot, with the queue id.
pub const QUEUED: &str = "250 2.0.0 Ok: queued as Q-{nonce}\r\n";

impl Behaviour {
    /// A well-behaved server offering STARTTLS and serving `cert`.
    pub fn tls(cert: CertKind) -> Self {
        Self::tls_with(cert, TlsKnobs::default())
    }

    /// A well-behaved server offering STARTTLS with explicit TLS knobs.
    pub fn tls_with(cert: CertKind, knobs: TlsKnobs) -> Self {
        Self {
            greeting: Act::reply(GREETING),
            ehlo: Act::reply(EHLO_OFFER),
            helo: Act::reply("250 {host}\r\n"),
            starttls: Act::reply(STARTTLS_GO),
            upgrade: Upgrade::Tls { cert, knobs },
            inject_before_server_hello: None,
            tls_banner: None,
            key_update: false,
            ehlo_tls: Act::reply(EHLO_TLS),
            mail: Act::reply("250 2.1.0 Ok\r\n"),
            rcpt: Act::reply("250 2.1.5 Ok\r\n"),
            rcpt_rules: Vec::new(),
            rcpt_limit: None,
            data: Act::reply("354 End data with <CR><LF>.<CR><LF>\r\n"),
            body: BodyAct::Read,
            dot: Act::reply(QUEUED),
            quit: Act::reply("221 2.0.0 Bye\r\n"),
        }
    }

    /// A well-behaved server with a valid certificate.
    pub fn good() -> Self {
        Self::tls(CertKind::Valid)
    }

    /// A plain ESMTP server: no STARTTLS, and 502 if it is sent anyway.
    pub fn plain() -> Self {
        Self {
            ehlo: Act::reply(EHLO_PLAIN),
            starttls: Act::reply(STARTTLS_UNKNOWN),
            upgrade: Upgrade::Stay,
            ..Self::good()
        }
    }

    /// A server that offers STARTTLS, answers 220, then plays `responder` instead of TLS.
    pub fn raw(responder: Responder) -> Self {
        Self { upgrade: Upgrade::Raw(responder), ..Self::good() }
    }

    /// A good server whose STARTTLS reply is `reply` (and which stays in plaintext unless the
    /// reply is positive).
    pub fn starttls_reply(reply: &'static str) -> Self {
        Self { starttls: Act::reply(reply), upgrade: Upgrade::Stay, ..Self::good() }
    }
}

/// The relay policies of research §0.1.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Policy {
    /// O: STARTTLS when offered, certificate unchecked, plaintext fallback.
    Opportunistic,
    /// F: TLS required, certificate unchecked.
    Forced,
    /// FV: TLS required, PKIX chain to the configured roots and the MX host name.
    ForcedVerify,
}

impl Policy {
    /// All three, in table order.
    pub const ALL: [Self; 3] = [Self::Opportunistic, Self::Forced, Self::ForcedVerify];

    /// Whether TLS is required (invariant I1 applies).
    pub fn is_forced(self) -> bool {
        !matches!(self, Self::Opportunistic)
    }

    /// The table code: `O`, `F` or `FV`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Opportunistic => "O",
            Self::Forced => "F",
            Self::ForcedVerify => "FV",
        }
    }
}

/// What the relay must end up doing with the message (research §0.2).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Outcome {
    /// Delivered over TLS.
    Tls,
    /// Delivered in plaintext on the same connection (STARTTLS absent or refused).
    Plain,
    /// Delivered in plaintext on a new connection that does not try STARTTLS, after a TLS
    /// failure once STARTTLS had been accepted (PLAIN*; immediate, same MX).
    PlainReconnect,
    /// Kept in the queue with a 4xx status; `code` is the enhanced status required, or `None`
    /// when any 4.x.x will do.
    Defer {
        /// Required enhanced status code, e.g. `4.7.4` or `4.7.5`.
        code: Option<&'static str>,
    },
    /// Permanent failure for the recipients.
    Bounce,
    /// Per-recipient outcomes, keyed by the local part the runner must use.
    Split(&'static [(&'static str, Outcome)]),
    /// Any of these is compliant (the research allows several behaviours).
    AnyOf(&'static [Outcome]),
}

impl Outcome {
    /// Any deferral.
    pub const DEFER: Self = Self::Defer { code: None };
    /// Deferral because TLS was not offered or was refused (X.7.4).
    pub const DEFER_NO_TLS: Self = Self::Defer { code: Some("4.7.4") };
    /// Deferral because the handshake or the certificate failed (X.7.5).
    pub const DEFER_TLS_FAILED: Self = Self::Defer { code: Some("4.7.5") };

    /// Whether an observed outcome satisfies this expectation. `Defer { code: None }` accepts
    /// any deferral; `Split` and `AnyOf` are compared entry by entry.
    pub fn accepts(&self, observed: &Outcome) -> bool {
        match (self, observed) {
            (Self::AnyOf(options), _) => options.iter().any(|o| o.accepts(observed)),
            (Self::Defer { code: None }, Self::Defer { .. }) => true,
            (Self::Split(want), Self::Split(got)) => {
                want.len() == got.len()
                    && want.iter().all(|(local, w)| {
                        got.iter().any(|(l, g)| l.eq_ignore_ascii_case(local) && w.accepts(g))
                    })
            }
            _ => self == observed,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tls => f.write_str("TLS"),
            Self::Plain => f.write_str("PLAIN"),
            Self::PlainReconnect => f.write_str("PLAIN*"),
            Self::Defer { code: None } => f.write_str("DEFER"),
            Self::Defer { code: Some(code) } => write!(f, "DEFER {code}"),
            Self::Bounce => f.write_str("BOUNCE"),
            Self::Split(parts) => {
                let parts: Vec<String> = parts.iter().map(|(l, o)| format!("{l}:{o}")).collect();
                write!(f, "SPLIT({})", parts.join(","))
            }
            Self::AnyOf(options) => {
                let options: Vec<String> = options.iter().map(ToString::to_string).collect();
                f.write_str(&options.join("|"))
            }
        }
    }
}

/// Which MX host must have accepted the message, per policy (multi-MX scenarios only).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Via {
    /// Under O.
    pub opportunistic: Option<&'static str>,
    /// Under F.
    pub forced: Option<&'static str>,
    /// Under FV.
    pub forced_verify: Option<&'static str>,
}

/// The expected outcome under each policy.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Expected {
    /// Under O.
    pub opportunistic: Outcome,
    /// Under F.
    pub forced: Outcome,
    /// Under FV.
    pub forced_verify: Outcome,
    /// The accepting MX host label (`mx1`, `mx2`) where it matters.
    pub via: Option<Via>,
}

impl Expected {
    /// Different outcomes per policy.
    pub const fn new(opportunistic: Outcome, forced: Outcome, forced_verify: Outcome) -> Self {
        Self { opportunistic, forced, forced_verify, via: None }
    }

    /// The same outcome under every policy.
    pub const fn all(outcome: Outcome) -> Self {
        Self::new(outcome, outcome, outcome)
    }

    /// The outcome for `policy`.
    pub fn outcome(&self, policy: Policy) -> Outcome {
        match policy {
            Policy::Opportunistic => self.opportunistic,
            Policy::Forced => self.forced,
            Policy::ForcedVerify => self.forced_verify,
        }
    }

    /// The MX host label that must accept the message under `policy`, if specified.
    pub fn via(&self, policy: Policy) -> Option<&'static str> {
        let via = self.via?;
        match policy {
            Policy::Opportunistic => via.opportunistic,
            Policy::Forced => via.forced,
            Policy::ForcedVerify => via.forced_verify,
        }
    }
}

/// A section of the research catalogue a scenario belongs to.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub enum Section {
    /// §2.1 STARTTLS availability and capability parsing.
    Capabilities,
    /// §2.2 the server's reply to STARTTLS.
    StartTlsReply,
    /// §2.3 TLS handshake and session behaviour.
    Handshake,
    /// §2.4 certificates.
    Certificates,
    /// §2.5 SMTP faults: greeting, EHLO, MAIL, RCPT, DATA, final dot.
    SmtpFaults,
    /// §2.5 network, timing and reply parsing.
    NetTimeParse,
    /// §2.6 multi-MX routing.
    MultiMx,
    /// §2.7 smarthost mode and AUTH.
    Smarthost,
    /// §3.1 STARTTLS stripping.
    Stripping,
    /// §3.2 response injection.
    Injection,
    /// §3.4 state reset after TLS.
    StateReset,
    /// §3.5 certificate MITM.
    CertificateMitm,
}

impl Section {
    /// Every section, in document order.
    pub const ALL: [Self; 12] = [
        Self::Capabilities,
        Self::StartTlsReply,
        Self::Handshake,
        Self::Certificates,
        Self::SmtpFaults,
        Self::NetTimeParse,
        Self::MultiMx,
        Self::Smarthost,
        Self::Stripping,
        Self::Injection,
        Self::StateReset,
        Self::CertificateMitm,
    ];

    /// The research section number.
    pub fn number(self) -> &'static str {
        match self {
            Self::Capabilities => "2.1",
            Self::StartTlsReply => "2.2",
            Self::Handshake => "2.3",
            Self::Certificates => "2.4",
            Self::SmtpFaults | Self::NetTimeParse => "2.5",
            Self::MultiMx => "2.6",
            Self::Smarthost => "2.7",
            Self::Stripping => "3.1",
            Self::Injection => "3.2",
            Self::StateReset => "3.4",
            Self::CertificateMitm => "3.5",
        }
    }
}

/// One MX host of a scenario.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MxSpec {
    /// First label of the host name: `mx1` → `mx1.<label>.sim.test`.
    pub name: &'static str,
    /// MX preference (lower is tried first).
    pub preference: u16,
    /// What the host does.
    pub role: MxRole,
}

/// What an MX host does.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum MxRole {
    /// Plays the scenario's own [`Scenario::behaviour`].
    Play,
    /// Plays another behaviour (the healthy or broken partner in a multi-MX scenario).
    PlayOther(Box<Behaviour>),
    /// Nothing listens: connections are refused (the address still resolves).
    Refuse,
}

impl MxSpec {
    /// `mx1`, preference 10, playing the scenario's behaviour.
    pub fn primary() -> Self {
        Self { name: "mx1", preference: 10, role: MxRole::Play }
    }
}

/// One destination domain and what a relay must do with mail for it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Scenario {
    /// Catalogue id, e.g. `CAP-01`.
    pub id: &'static str,
    /// Domain label, e.g. `cap-01`; the domain is `cap-01.sim.test`.
    pub label: String,
    /// What the server does.
    pub description: &'static str,
    /// RFC section or research row justifying the expected outcome.
    pub source: &'static str,
    /// Research sections this scenario exercises.
    pub sections: &'static [Section],
    /// The behaviour of MX hosts with [`MxRole::Play`].
    pub behaviour: Behaviour,
    /// The MX hosts, in any order (preferences decide).
    pub mx: Vec<MxSpec>,
    /// What the relay must do under O, F and FV.
    pub expected: Expected,
    /// The message carries REQUIRETLS (RFC 8689): a runner submits it with `MAIL FROM:<..>
    /// REQUIRETLS`, which raises every policy to a verified, REQUIRETLS-advertising next hop.
    pub requiretls: bool,
    /// Messages a black-box runner submits to this domain before any other scenario's, and
    /// waits for one of them to hang at the final dot: the healthy CAP-01 must then be
    /// delivered before the relay gives up on any of them (fairness: a destination that never
    /// answers must not hold back the others, issue 10 item 3). Zero for most scenarios.
    pub backlog: usize,
    /// What the domain publishes for MTA-STS (RFC 8461 §3); nothing for most scenarios.
    pub sts: StsKnobs,
}

impl Scenario {
    fn new(
        id: &'static str,
        sections: &'static [Section],
        description: &'static str,
        source: &'static str,
        behaviour: Behaviour,
        expected: Expected,
    ) -> Self {
        Self {
            id,
            label: id.to_ascii_lowercase(),
            description,
            source,
            sections,
            behaviour,
            mx: vec![MxSpec::primary()],
            expected,
            requiretls: false,
            backlog: 0,
            sts: StsKnobs::none(),
        }
    }

    fn with_backlog(mut self, messages: usize) -> Self {
        self.backlog = messages;
        self
    }

    fn with_requiretls(mut self) -> Self {
        self.requiretls = true;
        self
    }

    fn with_mx(mut self, mx: Vec<MxSpec>) -> Self {
        self.mx = mx;
        self
    }

    fn via(mut self, via: Via) -> Self {
        self.expected.via = Some(via);
        self
    }

    /// The recipient domain, `<label>.sim.test`.
    pub fn domain(&self) -> String {
        format!("{}.{ZONE}", self.label)
    }

    /// The full host name of an MX, `<name>.<label>.sim.test`.
    pub fn mx_host(&self, mx: &MxSpec) -> String {
        format!("{}.{}", mx.name, self.domain())
    }

    /// The behaviour an MX host plays, or `None` if nothing listens.
    pub fn behaviour_of<'a>(&'a self, mx: &'a MxSpec) -> Option<&'a Behaviour> {
        match &mx.role {
            MxRole::Play => Some(&self.behaviour),
            MxRole::PlayOther(behaviour) => Some(behaviour),
            MxRole::Refuse => None,
        }
    }
}

/// Looks a scenario up by id (case-insensitive).
pub fn find(id: &str) -> Option<Scenario> {
    catalogue().into_iter().find(|s| s.id.eq_ignore_ascii_case(id))
}

use Outcome::{Bounce, Plain, PlainReconnect, Tls};
use Section as S;

const DEFER: Outcome = Outcome::DEFER;
const D474: Outcome = Outcome::DEFER_NO_TLS;
const D475: Outcome = Outcome::DEFER_TLS_FAILED;
/// O continues in plaintext on the same connection; F/FV defer with 4.7.4.
const REFUSED: Expected = Expected::new(Plain, D474, D474);
/// O reconnects in plaintext; F/FV defer with 4.7.5.
const TLS_BROKEN: Expected = Expected::new(PlainReconnect, D475, D475);
/// The certificate is accepted by O and F, refused by FV.
const CERT_BAD: Expected = Expected::new(Tls, Tls, D475);
const ALL_TLS: Expected = Expected::all(Tls);
const ALL_DEFER: Expected = Expected::all(DEFER);
const ALL_BOUNCE: Expected = Expected::all(Bounce);
/// Injection: discarding the bytes gives TLS; feeding them to TLS or aborting fails the handshake.
const INJECTED: Expected = Expected::new(
    Outcome::AnyOf(&[Tls, PlainReconnect]),
    Outcome::AnyOf(&[Tls, D475]),
    Outcome::AnyOf(&[Tls, D475]),
);
const TLS_OR_DEFER: Outcome = Outcome::AnyOf(&[Tls, DEFER]);

fn r(text: &'static str) -> Act {
    Act::reply(text)
}

fn split(parts: &[&'static str]) -> Act {
    Act::Split(parts.iter().map(|p| Cow::Borrowed(*p)).collect())
}

fn knobs(f: impl FnOnce(&mut TlsKnobs)) -> TlsKnobs {
    let mut k = TlsKnobs::default();
    f(&mut k);
    k
}

fn other(name: &'static str, preference: u16, behaviour: Behaviour) -> MxSpec {
    MxSpec { name, preference, role: MxRole::PlayOther(Box::new(behaviour)) }
}

fn cert(
    id: &'static str,
    kind: CertKind,
    description: &'static str,
    source: &'static str,
) -> Scenario {
    let expected = if kind.verifies() { ALL_TLS } else { CERT_BAD };
    let sections: &'static [Section] = match kind {
        CertKind::SelfSigned | CertKind::UntrustedRoot => &[S::Certificates, S::CertificateMitm],
        _ => &[S::Certificates],
    };
    Scenario::new(id, sections, description, source, Behaviour::tls(kind), expected)
}

fn fault(
    id: &'static str,
    description: &'static str,
    source: &'static str,
    behaviour: Behaviour,
    outcome: Outcome,
) -> Scenario {
    Scenario::new(id, &[S::SmtpFaults], description, source, behaviour, Expected::all(outcome))
}

fn huge_ehlo() -> Act {
    let mut text = String::from("250-{host}\r\n250-STARTTLS\r\n");
    for i in 0..10_000 {
        text.push_str(&format!("250-X-FILLER-{i:05}\r\n"));
    }
    text.push_str("250 8BITMIME\r\n");
    Act::Reply(Cow::Owned(text))
}

/// The whole catalogue, in document order.
pub fn catalogue() -> Vec<Scenario> {
    let mut all = capabilities();
    all.extend(starttls_replies());
    all.extend(handshakes());
    all.extend(certificates());
    all.extend(security());
    all.extend(smtp_faults());
    all.extend(net_time_parse());
    all.extend(multi_mx());
    all.extend(out_of_step());
    all.extend(requiretls());
    all.extend(refused_in_tls());
    all
}

fn capabilities() -> Vec<Scenario> {
    let good = Behaviour::good;
    vec![
        Scenario::new(
            "CAP-01",
            &[S::Capabilities],
            "baseline: STARTTLS offered, 220, valid chain, SAN = MX name",
            "RFC 3207 §4",
            good(),
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-02",
            &[S::Capabilities, S::Stripping],
            "STARTTLS not offered; STARTTLS sent anyway gets 502",
            "RFC 3207 §6; Postfix \"TLS is required, but was not offered\"",
            Behaviour::plain(),
            REFUSED,
        ),
        Scenario::new(
            "CAP-03",
            &[S::Capabilities, S::Stripping],
            "MITM strip: STARTTLS removed from EHLO, last line rewritten to `250 `; STARTTLS answered 454",
            "nogotofail SmtpStartTlsStripHandler; striptls StripFromCapabilities; research §3.1",
            Behaviour {
                ehlo: r("250-{host}\r\n250-PIPELINING\r\n250 8BITMIME\r\n"),
                ..Behaviour::starttls_reply(
                    "454 4.7.0 TLS not available due to temporary reason\r\n",
                )
            },
            REFUSED,
        ),
        Scenario::new(
            "CAP-04",
            &[S::Capabilities, S::Stripping],
            "STARTTLS overwritten as `250 XXXXXXXA`; STARTTLS gets `500 #5.5.1 command not recognized`",
            "Cisco ESA/ASA ESMTP inspection; Durumeric et al. IMC'15",
            Behaviour {
                ehlo: r("250-{host}\r\n250-PIPELINING\r\n250 XXXXXXXA\r\n"),
                ..Behaviour::starttls_reply("500 #5.5.1 command not recognized\r\n")
            },
            REFUSED,
        ),
        Scenario::new(
            "CAP-05",
            &[S::Capabilities, S::Stripping],
            "not ESMTP: EHLO 502, HELO 250, STARTTLS 502",
            "RFC 5321 §4.1.4; EAST Negotiation/D_1; striptls ProtocolDowngradeStripExtendedMode",
            Behaviour {
                ehlo: r("502 5.5.2 Error: command not recognized\r\n"),
                ..Behaviour::plain()
            },
            REFUSED,
        ),
        Scenario::new(
            "CAP-06",
            &[S::Capabilities],
            "`250-starttls ` in lower case with trailing whitespace",
            "RFC 5321 §2.4 (keywords are case-insensitive)",
            Behaviour { ehlo: r("250-{host}\r\n250-starttls \r\n250 8bitmime\r\n"), ..good() },
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-07",
            &[S::Capabilities],
            "STARTTLS only on the first EHLO line (`250-STARTTLS` / `250 <host>`); team decision: recognised",
            "RFC 1869/5321 grammar; research §7 decision 7",
            Behaviour { ehlo: r("250-STARTTLS\r\n250 {host}\r\n"), ..good() },
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-08",
            &[S::Capabilities],
            "STARTTLS not advertised but accepted if sent; F/FV send it anyway",
            "mox (\"TLS is required, so we attempt it regardless\"); research §7 decision 6",
            Behaviour { ehlo: r(EHLO_PLAIN), ..good() },
            Expected::new(Plain, Tls, Tls),
        ),
        Scenario::new(
            "CAP-09",
            &[S::Capabilities, S::StateReset],
            "capabilities differ: before TLS `SIZE 100` and `AUTH PLAIN`; after TLS `SIZE 10000000` and `8BITMIME`",
            "RFC 3207 §4.2 (discard knowledge not obtained from the TLS negotiation)",
            Behaviour {
                ehlo: r("250-{host}\r\n250-SIZE 100\r\n250-AUTH PLAIN\r\n250 STARTTLS\r\n"),
                ehlo_tls: r(
                    "250-{host}\r\n250-X-REAL-{nonce}\r\n250-SIZE 10000000\r\n250 8BITMIME\r\n",
                ),
                ..good()
            },
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-10",
            &[S::Capabilities, S::StateReset],
            "EHLO inside TLS still lists STARTTLS; a second STARTTLS gets 503",
            "RFC 3207 §4.2",
            Behaviour {
                ehlo_tls: r(
                    "250-{host}\r\n250-X-REAL-{nonce}\r\n250-PIPELINING\r\n250 STARTTLS\r\n",
                ),
                ..good()
            },
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-11",
            &[S::Capabilities, S::StateReset],
            "inside TLS, MAIL before EHLO gets `503 5.5.1` (every fake server enforces this)",
            "RFC 3207 §4.2; chrj/smtpd PR #41",
            good(),
            ALL_TLS,
        ),
        Scenario::new(
            "CAP-12",
            &[S::Capabilities],
            "SMTPUTF8 offered inside TLS (a message that needs it may come here; an ASCII one goes as usual)",
            "RFC 6531 §3.1",
            Behaviour { ehlo_tls: r(EHLO_TLS_SMTPUTF8), ..good() },
            ALL_TLS,
        ),
    ]
}

fn starttls_replies() -> Vec<Scenario> {
    let sr = Behaviour::starttls_reply;
    let sec: &'static [Section] = &[S::StartTlsReply, S::Stripping];
    vec![
        Scenario::new(
            "STL-01",
            sec,
            "STARTTLS answered `454 4.7.0`",
            "RFC 3207 §4; EAST Negotiation/O_3; striptls StripWithTemporaryError",
            sr("454 4.7.0 TLS not available due to temporary reason\r\n"),
            REFUSED,
        ),
        Scenario::new(
            "STL-02",
            sec,
            "STARTTLS answered `502 5.5.1`",
            "EAST Negotiation/O_2; RFC 8461 §5 (treat as transient)",
            sr("502 5.5.1 Command not implemented\r\n"),
            REFUSED,
        ),
        Scenario::new(
            "STL-03",
            sec,
            "STARTTLS answered `501 5.5.4`",
            "striptls StripWithError; RFC 3207 §4",
            sr("501 5.5.4 Syntax error\r\n"),
            REFUSED,
        ),
        Scenario::new(
            "STL-04",
            &[S::StartTlsReply],
            "STARTTLS answered `421 4.3.2`, then close",
            "EAST others/starttls/421; RFC 5321 §3.8",
            Behaviour {
                starttls: Act::ReplyClose(Cow::Borrowed("421 4.3.2 Service shutting down\r\n")),
                upgrade: Upgrade::Stay,
                ..Behaviour::good()
            },
            ALL_DEFER,
        ),
        Scenario::new(
            "STL-05",
            sec,
            "STARTTLS answered `354` (out of place; never start TLS on a 3xx)",
            "EAST Negotiation/O_4",
            sr("354 go ahead\r\n"),
            REFUSED,
        ),
        Scenario::new(
            "STL-06",
            sec,
            "STARTTLS answered `200 STRIPTLS` and no TLS (a ClientHello gets a plaintext 500)",
            "striptls StripWithInvalidResponseCode; Postfix treats any 2xx as go-ahead",
            sr("200 STRIPTLS\r\n"),
            Expected::new(
                Outcome::AnyOf(&[Plain, PlainReconnect]),
                Outcome::AnyOf(&[D474, D475]),
                Outcome::AnyOf(&[D474, D475]),
            ),
        ),
        Scenario::new(
            "STL-07",
            &[S::StartTlsReply],
            "220, then the ClientHello is answered in plaintext `500 5.5.1 what is this`",
            "EAST others/starttls/220; research §1.3",
            Behaviour::raw(Responder::Plaintext(Cow::Borrowed("500 5.5.1 what is this\r\n"))),
            TLS_BROKEN,
        ),
        Scenario::new(
            "STL-08",
            &[S::StartTlsReply],
            "220, then immediate close",
            "RFC 3207 §4 (SHOULD abort the connection)",
            Behaviour {
                starttls: Act::ReplyClose(Cow::Borrowed(STARTTLS_GO)),
                ..Behaviour::good()
            },
            TLS_BROKEN,
        ),
        Scenario::new(
            "STL-09",
            &[S::StartTlsReply],
            "220, then silence: no ServerHello (tarpit)",
            "invariant I7",
            Behaviour::raw(Responder::Silence),
            TLS_BROKEN,
        ),
        Scenario::new(
            "STL-10",
            &[S::StartTlsReply],
            "multi-line `220-Ready` / `220 go ahead` split across two writes with a pause",
            "RFC 5321 §4.2.1",
            Behaviour {
                starttls: split(&["220-2.0.0 Ready\r\n", "220 2.0.0 go ahead\r\n"]),
                ..Behaviour::good()
            },
            ALL_TLS,
        ),
    ]
}

fn handshakes() -> Vec<Scenario> {
    let sec: &'static [Section] = &[S::Handshake];
    let k = |f: fn(&mut TlsKnobs)| Behaviour::tls_with(CertKind::Valid, knobs(f));
    vec![
        Scenario::new(
            "HS-01",
            sec,
            "fatal `handshake_failure` alert after the ClientHello (no shared cipher)",
            "Postfix TLS_README; maddy TLSErrFallback",
            Behaviour::raw(Responder::Alert(40)),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-02",
            sec,
            "fatal `protocol_version` alert (TLS 1.0/1.1-only server)",
            "RFC 8996; EFF starttls-backend TestNoTLS12",
            Behaviour::raw(Responder::Alert(70)),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-02B",
            sec,
            "TLS 1.0 ServerHello choosing RC4-SHA (legacy-only server)",
            "badssl tls-v1-0; research §1.3",
            Behaviour::raw(Responder::LegacyHello),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-03",
            sec,
            "TLS 1.2-only server",
            "positive control",
            k(|k| k.versions = TlsVersions::Tls12),
            ALL_TLS,
        ),
        Scenario::new(
            "HS-04",
            sec,
            "TLS 1.3-only server",
            "positive control",
            k(|k| k.versions = TlsVersions::Tls13),
            ALL_TLS,
        ),
        Scenario::new(
            "HS-05",
            sec,
            "server supports only secp384r1, forcing a HelloRetryRequest",
            "HRR path",
            k(|k| k.groups = KxGroups::Secp384Only),
            ALL_TLS,
        ),
        Scenario::new(
            "HS-06",
            sec,
            "TLS 1.2 ServerHello choosing a suite the client never offered",
            "robustness",
            Behaviour::raw(Responder::UnofferedSuite),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-07",
            sec,
            "after 220, non-TLS bytes (an HTTP status line) instead of a ServerHello",
            "as STL-07",
            Behaviour::raw(Responder::Plaintext(Cow::Borrowed("HTTP/1.1 400 Bad Request\r\n\r\n"))),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-08",
            sec,
            "certificate and signing key do not match (bad CertificateVerify)",
            "swaks regression 00202",
            k(|k| k.mismatched_key = true),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-09",
            sec,
            "mandatory client certificate (TLS 1.3: the failure surfaces at the first read after the handshake)",
            "Sovite MTA comment; classify as a TLS failure",
            k(|k| k.client_auth = ClientAuth::Required),
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-10",
            sec,
            "optional client certificate (CertificateRequest; an empty answer is accepted)",
            "positive control",
            k(|k| k.client_auth = ClientAuth::Optional),
            ALL_TLS,
        ),
        Scenario::new(
            "HS-11",
            sec,
            "every reply split into 32-byte TLS records",
            "parser robustness",
            k(|k| k.max_fragment_size = Some(32)),
            ALL_TLS,
        ),
        Scenario::new(
            "HS-12",
            sec,
            "handshake completes, then the server closes before answering EHLO (treated as a failed handshake)",
            "invariants I5, I7; research §2.3 (choose one)",
            Behaviour { ehlo_tls: Act::Close, ..Behaviour::good() },
            TLS_BROKEN,
        ),
        Scenario::new(
            "HS-13",
            sec,
            "unsolicited `220` banner right after the handshake (as if implicit TLS)",
            "RFC 3207 §4.2 (no greeting after TLS)",
            Behaviour {
                tls_banner: Some(Cow::Borrowed("220 {host} ESMTP again\r\n")),
                ..Behaviour::good()
            },
            Expected::new(Outcome::AnyOf(&[PlainReconnect, DEFER]), DEFER, DEFER),
        ),
        Scenario::new(
            "HS-14",
            sec,
            "TLS 1.3 KeyUpdate from the server before every reply",
            "robustness",
            Behaviour { key_update: true, ..k(|k| k.versions = TlsVersions::Tls13) },
            ALL_TLS,
        ),
        Scenario::new(
            "HS-15",
            sec,
            "after `250` to the final dot, the server drops TCP without close_notify instead of answering QUIT",
            "RFC 5321 §4.2.5 (delivered; no retry)",
            Behaviour { quit: Act::Hangup, ..Behaviour::good() },
            ALL_TLS,
        ),
        Scenario::new(
            "HS-16",
            sec,
            "valid certificate only when SNI = MX name; self-signed otherwise",
            "RFC 6066; MTA-STS practice",
            k(|k| k.require_sni = true),
            ALL_TLS,
        ),
    ]
}

fn certificates() -> Vec<Scenario> {
    use CertKind as K;
    vec![
        cert(
            "CERT-01",
            K::Valid,
            "valid chain root → intermediate → leaf (ECDSA P-256), SAN = MX name",
            "badssl sha256/ecc256",
        ),
        cert(
            "CERT-02",
            K::SelfSigned,
            "self-signed leaf",
            "badssl self-signed; EAST T_1; RFC 8461 §5",
        ),
        cert(
            "CERT-03",
            K::UntrustedRoot,
            "chain to a root the relay does not trust (interception proxy)",
            "badssl untrusted-root; EAST T_2; striptls UntrustedIntercept",
        ),
        cert(
            "CERT-04",
            K::WrongHost,
            "wrong host: SAN = wrong.host.sim.test",
            "badssl wrong.host; EAST T_3",
        ),
        cert(
            "CERT-05",
            K::Expired,
            "expired (valid 2001-01-01 to 2002-01-01)",
            "badssl expired; EAST T_4",
        ),
        cert(
            "CERT-06",
            K::NotYetValid,
            "not yet valid (valid 3900-01-01 to 3950-01-01)",
            "RFC 5280 §4.1.2.5",
        ),
        cert(
            "CERT-07",
            K::MissingIntermediate,
            "intermediate missing from the served chain",
            "badssl incomplete-chain",
        ),
        cert(
            "CERT-08",
            K::CnOnly,
            "MX name in the CN only, no SAN",
            "RFC 9525 (no CN-ID); badssl no-san",
        ),
        cert("CERT-09", K::SanOnly, "SAN only, empty subject", "badssl no-subject"),
        cert("CERT-10", K::Wildcard, "wildcard `*.<domain>` covering the MX name", "RFC 9525 §6.3"),
        cert(
            "CERT-10B",
            K::WildcardTooDeep,
            "wildcard `*.sim.test`, two labels above the MX name",
            "RFC 9525 §6.3 (one label only)",
        ),
        cert(
            "CERT-11",
            K::RecipientDomain,
            "valid for the recipient domain, not the MX host name (team: FV matches the MX name)",
            "research §7 decision 4; RFC 8461 §4.1",
        ),
        cert("CERT-12", K::IpOnly, "only an IP SAN (127.0.0.1)", "swaks 127_0_0_1"),
        cert("CERT-13", K::LeafIsCa, "the leaf is a CA certificate", "RFC 5280 §4.2.1.9"),
        cert("CERT-13B", K::ClientAuthOnly, "leaf EKU is clientAuth only", "RFC 5280 §4.2.1.12"),
        cert(
            "CERT-17",
            K::NameConstraintViolated,
            "issued by an intermediate name-constrained to permitted.invalid",
            "RFC 5280 §4.2.1.10",
        ),
        cert(
            "CERT-18",
            K::Large,
            "very large certificate (1,000 extra SANs)",
            "badssl 1000-sans; invariant I8",
        ),
        cert(
            "CERT-19",
            K::ExtraIntermediates,
            "extra unrelated CA certificate before the intermediate",
            "badssl reversed-chain (approximation)",
        ),
        cert("CERT-20", K::Ed25519, "Ed25519 leaf", "RFC 8410"),
        cert("CERT-20B", K::EcdsaP384, "ECDSA P-384 leaf", "badssl ecc384"),
        cert("CERT-21", K::Rsa2048, "RSA-2048 leaf", "badssl rsa2048"),
    ]
}

fn security() -> Vec<Scenario> {
    let inj = |id, description, source, starttls: Act| {
        Scenario::new(
            id,
            &[S::Injection],
            description,
            source,
            Behaviour { starttls, ..Behaviour::good() },
            INJECTED,
        )
    };
    vec![
        inj(
            "INJ-01",
            "forged `250-X-INJECTED` / `250 AUTH PLAIN` in the same write as the 220",
            "EAST Buffering/B_1; Exim CVE-2021-38371; lettre 0.11.21 (research §3.2)",
            r("220 2.0.0 Ready to start TLS\r\n250-X-INJECTED\r\n250 AUTH PLAIN\r\n"),
        ),
        inj(
            "INJ-02",
            "CRLF-less fragment `250-AUTH PLA` in the same write as the 220",
            "nodemailer PR #1835",
            r("220 2.0.0 Ready to start TLS\r\n250-AUTH PLA"),
        ),
        Scenario::new(
            "INJ-03",
            &[S::Injection],
            "forged replies in a separate write, after the ClientHello arrived and before the ServerHello",
            "research §3.2 (bytes reach the TLS layer)",
            Behaviour {
                inject_before_server_hello: Some(Cow::Borrowed(
                    "250-X-INJECTED\r\n250 AUTH PLAIN\r\n",
                )),
                ..Behaviour::good()
            },
            TLS_BROKEN,
        ),
        inj(
            "INJ-04",
            "a whole forged transaction (EHLO, MAIL, RCPT, 354, `250 queued as FORGED`) after the 220",
            "research §3.2 (delivered on FORGED is critical)",
            r(
                "220 2.0.0 Ready to start TLS\r\n250-forged\r\n250 PIPELINING\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n250 2.0.0 Ok: queued as FORGED\r\n",
            ),
        ),
        inj(
            "INJ-05",
            "multi-line `220-` / `220 ` with the forged lines after the final line, same write",
            "research §3.2",
            r("220-2.0.0 Ready\r\n220 2.0.0 go ahead\r\n250-X-INJECTED\r\n250 AUTH PLAIN\r\n"),
        ),
        Scenario::new(
            "AUTH-01",
            &[S::Smarthost, S::Stripping],
            "STARTTLS stripped while `AUTH PLAIN LOGIN` is advertised; AUTH must never be sent in plaintext",
            "Go issue #22134; swaks #15; research §3.6 item 10",
            Behaviour {
                ehlo: r("250-{host}\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"),
                ..Behaviour::starttls_reply("454 4.7.0 TLS not available\r\n")
            },
            REFUSED,
        ),
    ]
}

fn smtp_faults() -> Vec<Scenario> {
    let g = Behaviour::good;
    vec![
        fault(
            "GRT-01",
            "nothing listens: connection refused",
            "RFC 5321 §5.1; maddy DownMX",
            g(),
            DEFER,
        )
        .with_mx(vec![MxSpec { role: MxRole::Refuse, ..MxSpec::primary() }]),
        fault(
            "GRT-02",
            "accept, then close at once",
            "RFC 5321 §3.8",
            Behaviour { greeting: Act::Close, ..g() },
            DEFER,
        ),
        fault(
            "GRT-03",
            "accept, never greet (tarpit)",
            "RFC 5321 §4.5.3.2.1; chasquid hang",
            Behaviour { greeting: Act::Tarpit, ..g() },
            DEFER,
        ),
        fault(
            "GRT-04",
            "greeting dripped one byte at a time, finishing in time",
            "EFF starttls-backend TestSuccessWithDelayedGreeting",
            Behaviour { greeting: Act::Drip(Cow::Borrowed(GREETING)), ..g() },
            Tls,
        ),
        fault(
            "GRT-05",
            "`220-` line, a pause, then the final `220 ` line; talking early is recorded",
            "RFC 5321 §4.3.1; Postfix postscreen",
            Behaviour { greeting: split(&["220-{host} ESMTP\r\n", "220 {host} ready\r\n"]), ..g() },
            Tls,
        ),
        fault(
            "GRT-06",
            "`421` greeting",
            "EAST others/greeting/421",
            Behaviour {
                greeting: Act::ReplyClose(Cow::Borrowed("421 4.3.2 {host} busy\r\n")),
                ..g()
            },
            DEFER,
        ),
        fault(
            "GRT-07",
            "`554 No SMTP service here` greeting (team: defer)",
            "RFC 5321 §3.1; research §7 decision 3",
            Behaviour { greeting: r("554 5.3.2 No SMTP service here\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "GRT-08",
            "greeting with the wrong code (`250`)",
            "EAST others/greeting; mox \"Invalid greeting\"",
            Behaviour { greeting: r("250 {host} wrong code\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "GRT-09",
            "non-SMTP banner (`SSH-2.0-OpenSSH_9.2`)",
            "robustness",
            Behaviour { greeting: r("SSH-2.0-OpenSSH_9.2\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "GRT-12",
            "PIX-masked banner `220 ****`",
            "smtp-sink -P",
            Behaviour { greeting: r("220 ******************************\r\n"), ..g() },
            Tls,
        ),
        fault(
            "EHLO-02",
            "EHLO answered `421`, then close",
            "EAST others/ehlo/421",
            Behaviour { ehlo: Act::ReplyClose(Cow::Borrowed("421 4.3.2 closing\r\n")), ..g() },
            DEFER,
        ),
        Scenario::new(
            "EHLO-03",
            &[S::SmtpFaults, S::Stripping],
            "EHLO `550`, HELO `250`, STARTTLS `502`",
            "RFC 5321 §4.1.4; EAST others/ehlo",
            Behaviour { ehlo: r("550 5.7.1 EHLO rejected\r\n"), ..Behaviour::plain() },
            REFUSED,
        ),
        fault(
            "EHLO-05",
            "EHLO answered with a wrong code (`354`)",
            "EAST others/ehlo/354",
            Behaviour { ehlo: r("354 what\r\n"), ..g() },
            DEFER,
        ),
        Scenario::new(
            "EHLO-06",
            &[S::SmtpFaults],
            "huge EHLO reply (10,000 lines; STARTTLS on line 2): bounded parsing or defer",
            "invariant I8; EAST others/ehlo/250-all",
            Behaviour { ehlo: huge_ehlo(), ..g() },
            Expected::all(TLS_OR_DEFER),
        ),
        fault(
            "EHLO-07",
            "EHLO reply with mixed codes (`250-` then `500 `)",
            "mox TestErrors",
            Behaviour { ehlo: r("250-{host}\r\n500 different code\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "MAIL-01",
            "MAIL answered `451`",
            "mox TestErrors",
            Behaviour { mail: r("451 4.3.0 try later\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "MAIL-02",
            "MAIL answered `550 5.7.0`",
            "maddy MAILFROMErr",
            Behaviour { mail: r("550 5.7.0 sender rejected\r\n"), ..g() },
            Bounce,
        ),
        fault(
            "RCPT-01",
            "RCPT answered `451`",
            "mox; chasquid",
            Behaviour { rcpt: r("451 4.2.0 try later\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "RCPT-02",
            "RCPT answered `550`",
            "maddy RcptErr",
            Behaviour { rcpt: r("550 5.1.1 no such user\r\n"), ..g() },
            Bounce,
        ),
        fault(
            "RCPT-03",
            "per recipient: `ok` 250, `bounce` 554, `later` 451",
            "mox multi2",
            Behaviour {
                rcpt_rules: vec![
                    ("bounce", r("554 5.7.1 rejected\r\n")),
                    ("later", r("451 4.2.0 try later\r\n")),
                ],
                ..g()
            },
            Outcome::Split(&[("ok", Tls), ("bounce", Bounce), ("later", DEFER)]),
        ),
        fault(
            "RCPT-04",
            "`452 4.5.3` after 2 recipients in a transaction: send the rest in another",
            "RFC 5321 §4.5.3.1.10",
            Behaviour { rcpt_limit: Some(2), ..g() },
            Tls,
        ),
        fault(
            "DATA-01",
            "DATA answered `451`",
            "chasquid TestSMTPErrors",
            Behaviour { data: r("451 4.3.0 try later\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "DATA-02",
            "DATA answered `554`",
            "chasquid; mox",
            Behaviour { data: r("554 5.7.1 no\r\n"), ..g() },
            Bounce,
        ),
        fault(
            "DATA-03",
            "354, then close at the first body line",
            "RFC 5321 §3.8",
            Behaviour { body: BodyAct::CloseMidway, ..g() },
            DEFER,
        ),
        fault(
            "EOD-02",
            "final dot answered `451`",
            "RFC 5321 §4.2.5",
            Behaviour { dot: r("451 4.3.0 try later\r\n"), ..g() },
            DEFER,
        ),
        fault(
            "EOD-03",
            "final dot answered `554`",
            "chasquid",
            Behaviour { dot: r("554 5.7.1 content rejected\r\n"), ..g() },
            Bounce,
        ),
        fault(
            "EOD-04",
            "no reply to the final dot (tarpit)",
            "RFC 5321 §4.5.3.2 (10 min); RFC 1047",
            Behaviour { dot: Act::Tarpit, ..g() },
            DEFER,
        ),
        fault(
            "EOD-07",
            "no reply to the final dot, ever (the server holds the connection until the client gives up); a black-box runner queues 20 messages here first, and a healthy domain must not wait for them",
            "RFC 5321 §4.5.3.2; RFC 1047; Postfix qmgr (per-destination concurrency)",
            Behaviour { dot: Act::Hold, ..g() },
            DEFER,
        )
        .with_backlog(20),
        fault(
            "EOD-05",
            "close after the final dot, before replying",
            "RFC 5321 §3.8",
            Behaviour { dot: Act::Close, ..g() },
            DEFER,
        ),
        fault(
            "EOD-06",
            "`250` to the final dot, then close before the QUIT reply (delivered; no retry)",
            "RFC 5321 §4.2.5",
            Behaviour { quit: Act::Close, ..g() },
            Tls,
        ),
    ]
}

fn net_time_parse() -> Vec<Scenario> {
    let g = Behaviour::good;
    let ntp = |id, description, source, behaviour, outcome| {
        Scenario::new(
            id,
            &[S::NetTimeParse],
            description,
            source,
            behaviour,
            Expected::all(outcome),
        )
    };
    vec![
        ntp(
            "NET-01",
            "RST in answer to MAIL",
            "RFC 5321 §3.8",
            Behaviour { mail: Act::Reset, ..g() },
            DEFER,
        ),
        ntp(
            "NET-02",
            "FIN in answer to RCPT",
            "RFC 5321 §3.8",
            Behaviour { rcpt: Act::Close, ..g() },
            DEFER,
        ),
        ntp(
            "TIME-01",
            "MAIL reply delayed (Timing::delay, below the relay's timeout)",
            "smtp-sink -w",
            Behaviour { mail: Act::Delay(Cow::Borrowed("250 2.1.0 Ok\r\n")), ..g() },
            Tls,
        ),
        ntp(
            "PARSE-01",
            "code-only `250` to MAIL, empty continuation `250-` / `250 OK` to RCPT",
            "RFC 5321 §4.2",
            Behaviour { mail: r("250\r\n"), rcpt: r("250-\r\n250 OK\r\n"), ..g() },
            Tls,
        ),
        ntp(
            "PARSE-02",
            "bare-LF line ends in every reply",
            "chasquid fake server",
            Behaviour {
                greeting: r("220 {host} ESMTP\n"),
                ehlo: r("250-{host}\n250 STARTTLS\n"),
                starttls: r("220 go ahead\n"),
                ehlo_tls: r("250-{host}\n250 8BITMIME\n"),
                mail: r("250 ok\n"),
                rcpt: r("250 ok\n"),
                data: r("354 go\n"),
                dot: r("250 queued as Q-{nonce}\n"),
                quit: r("221 bye\n"),
                ..g()
            },
            TLS_OR_DEFER,
        ),
        ntp(
            "PARSE-05",
            "invalid reply code `2200` to MAIL",
            "RFC 5321 §4.3.2; mox \"2200\"",
            Behaviour { mail: r("2200 Ok\r\n"), ..g() },
            DEFER,
        ),
        ntp(
            "PARSE-06",
            "unknown but well-formed `251` to RCPT (act on the first digit)",
            "RFC 5321 §4.3.2",
            Behaviour { rcpt: r("251 2.1.5 will forward\r\n"), ..g() },
            Tls,
        ),
        ntp(
            "PARSE-10",
            "EOF in the middle of a multi-line EHLO reply",
            "robustness",
            Behaviour {
                ehlo: Act::ReplyClose(Cow::Borrowed("250-{host}\r\n250-PIPELINING\r\n")),
                ..g()
            },
            DEFER,
        ),
    ]
}

fn multi_mx() -> Vec<Scenario> {
    let sec: &'static [Section] = &[S::MultiMx];
    let good_mx2 = || other("mx2", 20, Behaviour::good());
    let via = |o, f, fv| Via { opportunistic: o, forced: f, forced_verify: fv };
    vec![
        Scenario::new(
            "MX-01",
            sec,
            "mx1 (10) has no STARTTLS; mx2 (20) has valid TLS (O tries TLS at mx2 first)",
            "Postfix next-MX after a policy failure; RFC 5321 §5.1; issue 10 item 8",
            Behaviour::plain(),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec::primary(), good_mx2()])
        .via(via(Some("mx2"), Some("mx2"), Some("mx2"))),
        Scenario::new(
            "MX-02",
            sec,
            "mx1 fails the handshake; mx2 has good TLS (O tries TLS at mx2 before plaintext)",
            "Postfix delivers via mx2 after a deferral; issue 10 item 8: in the same attempt",
            Behaviour::raw(Responder::Alert(40)),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec::primary(), good_mx2()])
        .via(via(Some("mx2"), Some("mx2"), Some("mx2"))),
        Scenario::new(
            "MX-03",
            sec,
            "mx1 has a self-signed certificate; mx2 a valid one",
            "maddy MTASTS_SkipNonMatching (analogous)",
            Behaviour::tls(CertKind::SelfSigned),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec::primary(), good_mx2()])
        .via(via(Some("mx1"), Some("mx1"), Some("mx2"))),
        Scenario::new(
            "MX-04",
            sec,
            "every MX fails the handshake (O: plaintext at the most preferred, same attempt)",
            "RFC 8461 §5; RFC 5321 §4.5.4.1",
            Behaviour::raw(Responder::Alert(40)),
            TLS_BROKEN,
        )
        .with_mx(vec![
            MxSpec::primary(),
            MxSpec { name: "mx2", preference: 20, role: MxRole::Play },
        ])
        .via(via(Some("mx1"), None, None)),
        Scenario::new(
            "MX-07",
            sec,
            "mx1 answers RCPT `550`; mx2 is good but must not be tried for that recipient",
            "conventional (a 5xx is final)",
            Behaviour { rcpt: r("550 5.1.1 no such user\r\n"), ..Behaviour::good() },
            ALL_BOUNCE,
        )
        .with_mx(vec![MxSpec::primary(), good_mx2()]),
        Scenario::new(
            "MX-09",
            sec,
            "mx1 refuses TCP; mx2 is good",
            "maddy DownMX; RFC 5321 §5.1",
            Behaviour::good(),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec { role: MxRole::Refuse, ..MxSpec::primary() }, good_mx2()])
        .via(via(Some("mx2"), Some("mx2"), Some("mx2"))),
    ]
}

/// Replies that answer nothing, and replies to DATA that are not 354 (invariant I9). Each MX1
/// misbehaves once and MX2 is healthy: the relay must drop mx1's connection as out of step
/// (never read a line as the answer to another command) and deliver through mx2. A relay that
/// takes such a reply at face value either records a delivery mx1 never took (no body was
/// sent), bounces on a line that answered nothing, or misses mx2: each shows, in process and
/// in black-box mode, as the wrong outcome or the wrong MX.
fn out_of_step() -> Vec<Scenario> {
    let g = Behaviour::good;
    let via_mx2 =
        Via { opportunistic: Some("mx2"), forced: Some("mx2"), forced_verify: Some("mx2") };
    let backed = |id, description, source, behaviour| {
        Scenario::new(id, &[S::SmtpFaults], description, source, behaviour, ALL_TLS)
            .with_mx(vec![MxSpec::primary(), other("mx2", 20, Behaviour::good())])
            .via(via_mx2)
    };
    let extra = "250 2.0.0 extra\r\n";
    let lockstep = || Behaviour { ehlo_tls: r(EHLO_TLS_LOCKSTEP), ..g() };
    vec![
        backed(
            "GRT-13",
            "one unsolicited `250 2.0.0 extra` line right after the greeting; mx2 is good",
            "RFC 5321 §4.2 (one reply per command); invariant I9",
            Behaviour { greeting: r("220 {host} ESMTP\r\n250 2.0.0 extra\r\n"), ..g() },
        ),
        backed(
            "EHLO-08",
            "one unsolicited `250 2.0.0 extra` line after the EHLO reply, before TLS (it would be read as the answer to STARTTLS); mx2 is good",
            "RFC 5321 §4.2; invariant I9",
            Behaviour { ehlo: Act::Reply(Cow::Owned(format!("{EHLO_OFFER}{extra}"))), ..g() },
        ),
        backed(
            "EHLO-09",
            "one unsolicited `250 2.0.0 extra` line after the EHLO reply inside TLS (pipelined MAIL would read it, DATA would read RCPT's 250: \"delivered\", no body); mx2 is good",
            "RFC 2920 §3.1 (replies in order, one per command); invariant I9",
            Behaviour { ehlo_tls: Act::Reply(Cow::Owned(format!("{EHLO_TLS}{extra}"))), ..g() },
        ),
        backed(
            "MAIL-03",
            "no PIPELINING; one unsolicited `550 5.7.1 extra` line after the MAIL reply (read as the answer to RCPT it would bounce); mx2 is good",
            "RFC 5321 §4.2; invariant I9",
            Behaviour { mail: r("250 2.1.0 Ok\r\n550 5.7.1 extra\r\n"), ..lockstep() },
        ),
        backed(
            "RCPT-05",
            "no PIPELINING; one unsolicited `550 5.7.1 extra` line after the RCPT reply (read as the answer to DATA it would bounce); mx2 is good",
            "RFC 5321 §4.2; invariant I9",
            Behaviour { rcpt: r("250 2.1.5 Ok\r\n550 5.7.1 extra\r\n"), ..lockstep() },
        ),
        backed(
            "PIPE-01",
            "PIPELINING; one unsolicited `250 2.0.0 extra` line after the MAIL reply, in the middle of the MAIL/RCPT/DATA group (DATA would read RCPT's 250); mx2 is good",
            "RFC 2920 §3.1; invariant I9",
            Behaviour { mail: r("250 2.1.0 Ok\r\n250 2.0.0 extra\r\n"), ..g() },
        ),
        backed(
            "DATA-04",
            "DATA answered `250 2.0.0 pretend`: no body was asked for, nothing was delivered; mx2 is good",
            "RFC 5321 §4.3.2 (DATA: 354, then the reply to the dot); invariant I9",
            Behaviour { data: r("250 2.0.0 pretend\r\n"), ..g() },
        ),
        backed(
            "DATA-05",
            "DATA answered `334 go on` (a 3xx other than 354); mx2 is good",
            "RFC 5321 §4.3.2; invariant I9",
            Behaviour { data: r("334 go on\r\n"), ..g() },
        ),
    ]
}

/// REQUIRETLS (RFC 8689 §4.2.1): a next hop that does not advertise it after STARTTLS does not
/// qualify; the client ends that session and tries the remaining MX hosts, and returns the
/// message with 5.7.30 only when none qualifies.
fn requiretls() -> Vec<Scenario> {
    let with = || Behaviour { ehlo_tls: r(EHLO_TLS_REQUIRETLS), ..Behaviour::good() };
    let via_mx2 =
        Via { opportunistic: Some("mx2"), forced: Some("mx2"), forced_verify: Some("mx2") };
    vec![
        Scenario::new(
            "REQ-01",
            &[S::MultiMx],
            "REQUIRETLS message: mx1 (10) has valid TLS but does not advertise REQUIRETLS; mx2 (20) does",
            "RFC 8689 §4.2.1 (try the next MX; non-delivery only when none qualifies)",
            Behaviour::good(),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec::primary(), other("mx2", 20, with())])
        .via(via_mx2)
        .with_requiretls(),
        Scenario::new(
            "REQ-02",
            &[S::MultiMx],
            "REQUIRETLS message: neither mx1 nor mx2 advertises REQUIRETLS (5.7.30)",
            "RFC 8689 §4.2.1, §5.2 (REQUIRETLS not supported by the next hop: 5.7.30)",
            Behaviour::good(),
            ALL_BOUNCE,
        )
        .with_mx(vec![MxSpec::primary(), MxSpec { name: "mx2", preference: 20, role: MxRole::Play }])
        .with_requiretls(),
    ]
}

/// A server that completes the handshake and then refuses the session inside TLS (issue 17
/// item 1): Postfix with `smtpd_tls_req_ccert = yes` answers the EHLO `421 4.7.1 … No client
/// certificate presented`, aiosmtpd `421 4.3.2`. That is the host's answer about this client,
/// not a failure of TLS: a relay that reads it as a lost TLS session reconnects in plaintext
/// under O (the message goes out in clear to a host that just spoke TLS) and reports 4.7.5
/// under F/FV. The relay follows the reply: the next MX host, else defer with the server's code
/// (bounce on 5xx), and never plaintext to that host.
fn refused_in_tls() -> Vec<Scenario> {
    let g = Behaviour::good;
    let ccert = || Behaviour {
        ehlo_tls: Act::ReplyClose(Cow::Borrowed(
            "421 4.7.1 {host}: No client certificate presented\r\n",
        )),
        ..g()
    };
    let via_mx2 =
        Via { opportunistic: Some("mx2"), forced: Some("mx2"), forced_verify: Some("mx2") };
    vec![
        fault(
            "EHLO-10",
            "EHLO inside TLS answered `421 4.7.1 … No client certificate presented`, then closed (Postfix `smtpd_tls_req_ccert`): defer with the server's code, never plaintext",
            "Postfix smtpd_tls_req_ccert; issue 17 item 1",
            ccert(),
            Outcome::Defer { code: Some("4.7.1") },
        ),
        fault(
            "EHLO-11",
            "EHLO inside TLS answered `421 4.3.2 Service not available, closing transmission channel` (aiosmtpd): defer with 4.3.2, never plaintext",
            "aiosmtpd; RFC 5321 §3.8; issue 17 item 1",
            Behaviour {
                ehlo_tls: Act::ReplyClose(Cow::Borrowed(
                    "421 4.3.2 Service not available, closing transmission channel\r\n",
                )),
                ..g()
            },
            Outcome::Defer { code: Some("4.3.2") },
        ),
        Scenario::new(
            "EHLO-12",
            &[S::SmtpFaults, S::MultiMx],
            "mx1 refuses the session inside TLS (`421 4.7.1`); mx2 is good: TLS via mx2",
            "RFC 5321 §5.1 (next MX); issue 17 item 1",
            ccert(),
            ALL_TLS,
        )
        .with_mx(vec![MxSpec::primary(), other("mx2", 20, g())])
        .via(via_mx2),
        Scenario::new(
            "EHLO-13",
            &[S::SmtpFaults, S::MultiMx],
            "mx1 refuses the session inside TLS (`421 4.7.1`); mx2 offers no STARTTLS: O delivers in plaintext via mx2, never to mx1; F/FV defer",
            "issue 17 item 1 (never plaintext to a host that just spoke TLS)",
            ccert(),
            Expected::new(Outcome::AnyOf(&[Plain, PlainReconnect]), DEFER, DEFER),
        )
        .with_mx(vec![MxSpec::primary(), other("mx2", 20, Behaviour::plain())])
        .via(Via { opportunistic: Some("mx2"), forced: None, forced_verify: None }),
        fault(
            "EHLO-14",
            "EHLO and HELO inside TLS answered `554 5.7.1 not accepted from this client`: a permanent refusal by the only host, so a bounce",
            "RFC 5321 §4.2.1, §3.8; Postfix (5xx from the final server bounces); issue 17 item 1",
            Behaviour {
                ehlo_tls: r("554 5.7.1 not accepted from this client\r\n"),
                helo: r("554 5.7.1 not accepted from this client\r\n"),
                ..g()
            },
            Bounce,
        ),
    ]
}
