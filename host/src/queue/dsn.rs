//! Delivery status notifications (RFC 3464): bounces and delay warnings.
//!
//! A DSN goes from the null sender (`MAIL FROM:<>`, RFC 5321 §4.5.5), so it can never cause
//! another bounce; a message from the null sender never gets one.

use std::fmt::Write as _;

/// What the report says about one recipient.
#[derive(Clone, Debug)]
pub struct DsnRecipient {
    /// The recipient address.
    pub address: String,
    /// `failed` or `delayed`.
    pub action: &'static str,
    /// Enhanced status code.
    pub status: String,
    /// The reason, as the relay or the remote server gave it.
    pub diagnostic: String,
}

/// Builds the DSN message (headers and body, CRLF) for `original` to `to`. `message_id` is
/// the report's own `Message-ID` (RFC 5322 §3.6.4, angle brackets included): without one,
/// receiving systems add their own or score the report as spam, and replies cannot thread.
pub fn build(
    reporting_mta: &str,
    to: &str,
    original_id: &str,
    original: &[u8],
    recipients: &[DsnRecipient],
    date: &str,
    message_id: &str,
) -> Vec<u8> {
    let boundary = format!("=_postwarden_{original_id}");
    let delayed = recipients.iter().all(|r| r.action == "delayed");
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let mut out = String::new();
    let _ = write!(
        out,
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: {message_id}\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\"\r\n\
         \r\n\
         This is a delivery status notification in MIME format.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\
         \r\n"
    );
    if delayed {
        out.push_str("Your message could not be delivered yet; the relay keeps trying.\r\n\r\n");
    } else {
        out.push_str("Your message could not be delivered to the following recipients.\r\n\r\n");
    }
    for r in recipients {
        let _ = write!(out, "<{}>: {} {}\r\n", r.address, r.status, one_line(&r.diagnostic));
    }
    let _ = write!(
        out,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {reporting_mta}\r\n\
         X-Postwarden-Queue-ID: {original_id}\r\n"
    );
    for r in recipients {
        let _ = write!(
            out,
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {}\r\nStatus: {}\r\nDiagnostic-Code: smtp; {}\r\n",
            r.address,
            r.action,
            r.status,
            one_line(&r.diagnostic)
        );
    }
    let _ = write!(out, "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n");
    let headers_end = find(original, b"\r\n\r\n").map_or(original.len(), |i| i + 2);
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&original[..headers_end]);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_the_rfc3464_parts() {
        let dsn = build(
            "relay.example",
            "sender@example.org",
            "abc",
            b"Subject: hi\r\nFrom: sender@example.org\r\n\r\nsecret body\r\n",
            &[DsnRecipient {
                address: "user@bank.example".into(),
                action: "failed",
                status: "4.7.4".into(),
                diagnostic: "TLS is required, but was not offered by mx.bank.example".into(),
            }],
            "Mon, 30 Nov 2026 08:00:00 +0000",
            "<abc.1.dsn@relay.example>",
        );
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.contains("\r\nMessage-ID: <abc.1.dsn@relay.example>\r\n"), "{text}");
        assert!(text.contains(
            "Final-Recipient: rfc822; user@bank.example\r\nAction: failed\r\nStatus: 4.7.4\r\n"
        ));
        assert!(text.contains(
            "Diagnostic-Code: smtp; TLS is required, but was not offered by mx.bank.example"
        ));
        assert!(text.contains("Subject: hi\r\n"), "original headers included");
        assert!(!text.contains("secret body"), "the body is not returned");
    }
}
