//! EHLO capability parsing (RFC 5321 §4.1.1.1, §2.2.2).
//!
//! The EHLO reply is the server's word on what it supports, and the relay's TLS decision rests
//! on it, so the parser is total: any reply, however malformed, yields a [`Capabilities`] value
//! and never an error or a panic. Lines it cannot make sense of are skipped; what it does not
//! know is kept in [`Capabilities::other`] for logs.
//!
//! A capability set describes one EHLO reply only. After STARTTLS the old set must be dropped
//! and a new one parsed from the post-TLS EHLO (RFC 3207 §4.2), so there is no way to merge or
//! update one.

use super::reply::Reply;

/// The extensions a server announced in its reply to `EHLO`.
///
/// Fields are public because this is plain data that tests and the simulator construct
/// directly; `Default` is "nothing announced", which is also what a `HELO` session has.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Capabilities {
    /// `STARTTLS` (RFC 3207) was announced.
    pub starttls: bool,
    /// `PIPELINING` (RFC 2920) was announced.
    pub pipelining: bool,
    /// `SIZE` (RFC 1870): `None` when not announced; `Some(0)` when announced without a value,
    /// or with 0, both of which RFC 1870 defines as "no fixed maximum"; `Some(n)` for a limit
    /// of `n` bytes. Announced-but-unlimited is kept distinct from absent because the `SIZE=`
    /// parameter may only be sent in the first case. A `SIZE` line whose value is not a number
    /// is garbage and goes to [`other`](Self::other) instead.
    pub size: Option<u64>,
    /// `8BITMIME` (RFC 6152) was announced.
    pub eight_bit_mime: bool,
    /// `ENHANCEDSTATUSCODES` (RFC 2034) was announced.
    pub enhanced_status_codes: bool,
    /// `REQUIRETLS` (RFC 8689) was announced.
    pub requiretls: bool,
    /// `SMTPUTF8` (RFC 6531) was announced.
    pub smtputf8: bool,
    /// `CHUNKING` (RFC 3030) was announced.
    pub chunking: bool,
    /// The SASL mechanisms from `AUTH` (RFC 4954), upper-cased, without duplicates, in the
    /// order given. The pre-standard `AUTH=PLAIN LOGIN` form is accepted too.
    pub auth: Vec<String>,
    /// Other well-formed extension lines, trimmed, in the order given.
    pub other: Vec<String>,
}

impl Capabilities {
    /// Reads the capabilities from a reply to `EHLO`.
    ///
    /// The reply code is not checked: the session decides what a non-2xx reply means (usually
    /// a fallback to `HELO`) before asking for capabilities. Keywords are case-insensitive
    /// (RFC 5321 §2.4) and trailing whitespace is ignored.
    ///
    /// The first line is the server's domain and greeting, not an extension, so it is skipped,
    /// with one exception: a first line reading `STARTTLS` still counts (research decision
    /// CAP-07, "lenient"). Erring that way can only lead to a TLS attempt, never to plaintext,
    /// whereas honouring other keywords there (such as `PIPELINING`) could break a session.
    pub fn from_reply(reply: &Reply) -> Self {
        let mut caps = Self::default();
        let mut lines = reply.lines().iter();
        let first_word = lines.next().and_then(|first| first.split_ascii_whitespace().next());
        if first_word.is_some_and(|word| word.eq_ignore_ascii_case("STARTTLS")) {
            caps.starttls = true;
        }
        for line in lines {
            caps.add_line(line);
        }
        caps
    }

    /// The announced size limit, or `None` when there is no known limit (not announced, or
    /// announced as 0).
    pub fn size_limit(&self) -> Option<u64> {
        self.size.filter(|&size| size > 0)
    }

    fn add_line(&mut self, line: &str) {
        let line = line.trim_matches(|c: char| c.is_ascii_whitespace());
        let mut words = line.split_ascii_whitespace();
        let Some(first) = words.next() else {
            return;
        };
        let (keyword, inline_param) = match first.split_once('=') {
            Some((keyword, param)) if keyword.eq_ignore_ascii_case("AUTH") => {
                (keyword, Some(param))
            }
            _ => (first, None),
        };
        if !is_ehlo_keyword(keyword) {
            return;
        }
        match keyword.to_ascii_uppercase().as_str() {
            "STARTTLS" => self.starttls = true,
            "PIPELINING" => self.pipelining = true,
            "8BITMIME" => self.eight_bit_mime = true,
            "ENHANCEDSTATUSCODES" => self.enhanced_status_codes = true,
            "REQUIRETLS" => self.requiretls = true,
            "SMTPUTF8" => self.smtputf8 = true,
            "CHUNKING" => self.chunking = true,
            "SIZE" => match words.next().map(str::parse::<u64>) {
                None => self.size = Some(0),
                Some(Ok(size)) => self.size = Some(size),
                Some(Err(_)) => self.other.push(line.to_owned()),
            },
            "AUTH" => {
                for mechanism in inline_param.into_iter().chain(words) {
                    let mechanism = mechanism.to_ascii_uppercase();
                    if is_sasl_mechanism(&mechanism) && !self.auth.contains(&mechanism) {
                        self.auth.push(mechanism);
                    }
                }
            }
            _ => self.other.push(line.to_owned()),
        }
    }
}

/// `ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")` (RFC 5321 §4.1.1.1).
fn is_ehlo_keyword(word: &str) -> bool {
    let mut bytes = word.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// `sasl-mech = 1*20(ALPHA / DIGIT / "-" / "_")` (RFC 4422 §3.1), checked after upper-casing.
fn is_sasl_mechanism(word: &str) -> bool {
    (1..=20).contains(&word.len())
        && word
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::super::reply::ReplyParser;
    use super::*;
    use proptest::prelude::*;

    fn caps(lines: &[&str]) -> Capabilities {
        let last = lines.len() - 1;
        let mut wire = String::new();
        for (i, line) in lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            wire.push_str(&format!("250{sep}{line}\r\n"));
        }
        let (reply, _) = ReplyParser::new()
            .parse(wire.as_bytes())
            .expect("valid reply")
            .expect("complete reply");
        Capabilities::from_reply(&reply)
    }

    #[test]
    fn typical_reply() {
        let c = caps(&[
            "mx.example Hello relay.example",
            "PIPELINING",
            "SIZE 10240000",
            "STARTTLS",
            "AUTH PLAIN LOGIN",
            "ENHANCEDSTATUSCODES",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "CHUNKING",
            "REQUIRETLS",
        ]);
        assert_eq!(
            c,
            Capabilities {
                starttls: true,
                pipelining: true,
                size: Some(10_240_000),
                eight_bit_mime: true,
                enhanced_status_codes: true,
                requiretls: true,
                smtputf8: true,
                chunking: true,
                auth: vec!["PLAIN".into(), "LOGIN".into()],
                other: vec!["DSN".into()],
            }
        );
        assert_eq!(c.size_limit(), Some(10_240_000));
    }

    #[test]
    fn greeting_line_only() {
        assert_eq!(caps(&["mx.example"]), Capabilities::default());
    }

    #[test]
    fn starttls_variants() {
        let cases: &[(&[&str], bool)] = &[
            (&["mx", "STARTTLS"], true),
            (&["mx", "starttls"], true),
            (&["mx", "StartTLS  "], true),
            (&["mx", "STARTTLS\t"], true),
            (&["mx", " STARTTLS"], true),
            // CAP-07, lenient: STARTTLS on the first line counts.
            (&["STARTTLS", "mx.example"], true),
            (&["STARTTLS"], true),
            (&["starttls extra"], true),
            (&["mx"], false),
            (&["mx", "XXXXXXXA"], false),
            (&["mx", "STARTTLSX"], false),
            (&["mx", "X-STARTTLS"], false),
            (&["mx.example STARTTLS"], false),
        ];
        for &(lines, expected) in cases {
            assert_eq!(caps(lines).starttls, expected, "{lines:?}");
        }
    }

    #[test]
    fn only_starttls_counts_on_the_first_line() {
        let c = caps(&["PIPELINING", "SIZE 5"]);
        assert!(!c.pipelining);
        assert_eq!(c.size, Some(5));
    }

    #[test]
    fn size_values() {
        let cases: &[(&[&str], Option<u64>, &[&str])] = &[
            (&["mx", "SIZE"], Some(0), &[]),
            (&["mx", "SIZE 0"], Some(0), &[]),
            (&["mx", "size 100"], Some(100), &[]),
            (&["mx", "SIZE abc"], None, &["SIZE abc"]),
            (&["mx", "SIZE -1"], None, &["SIZE -1"]),
            (&["mx", "SIZE 99999999999999999999999"], None, &["SIZE 99999999999999999999999"]),
            (&["mx"], None, &[]),
        ];
        for &(lines, size, other) in cases {
            let c = caps(lines);
            assert_eq!(c.size, size, "{lines:?}");
            assert_eq!(c.other, other, "{lines:?}");
        }
        assert_eq!(caps(&["mx", "SIZE 0"]).size_limit(), None);
    }

    #[test]
    fn auth_mechanisms() {
        let c =
            caps(&["mx", "AUTH plain LOGIN cram-md5", "AUTH=PLAIN XOAUTH2", "AUTH PLAIN bad/mech"]);
        assert_eq!(c.auth, ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]);
        assert!(c.other.is_empty());
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let c = caps(&[
            "mx",
            "",
            "   ",
            "-DASH",
            "\u{fffd}\u{fffd}",
            "=",
            "PIPE\0LINING",
            "X-EXPS GSSAPI NTLM",
            "PIPELINING",
        ]);
        assert!(c.pipelining);
        assert_eq!(c.other, ["X-EXPS GSSAPI NTLM"]);
    }

    proptest! {
        #[test]
        fn never_panics(lines in prop::collection::vec("\\PC{0,30}", 1..12)) {
            let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
            let _ = caps(&lines);
        }
    }
}
