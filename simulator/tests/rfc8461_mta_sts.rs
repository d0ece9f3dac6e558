//! RFC 8461 (MTA-STS) serving: the `_mta-sts` TXT records and the policy host
//! `mta-sts.<domain>`, checked over real sockets with the clients a relay uses (hickory-resolver,
//! rustls trusting only the test CA) and a hand-written HTTP/1.1 GET.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use hickory_proto::ProtoErrorKind;
use hickory_proto::op::ResponseCode;
use hickory_resolver::Resolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use postwarden_sim::sts::WELL_KNOWN_PATH;
use postwarden_sim::{
    CertKind, Event, Fleet, FleetOptions, Framing, HttpsKnobs, Service, StsKnobs, Timing, TxtFault,
    TxtRecord,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const POLICY: &str = "version: STSv1\nmode: enforce\nmx: mx1.a.sim.test\nmax_age: 86400\n";

/// A fleet without scenarios, serving only these STS set-ups.
async fn sts_fleet(setups: &[(&str, StsKnobs)]) -> Fleet {
    Fleet::start(FleetOptions {
        scenarios: Some(Vec::new()),
        timing: Timing::fast(),
        ca: Some(support::ca()),
        sts: setups.iter().map(|(d, k)| ((*d).to_owned(), k.clone())).collect(),
        ..FleetOptions::default()
    })
    .await
    .unwrap()
}

fn https(knobs: HttpsKnobs) -> StsKnobs {
    StsKnobs { txt: vec!["v=STSv1; id=1;".into()], txt_fault: None, https: Some(knobs) }
}

fn resolver(fleet: &Fleet, timeout: Duration) -> Resolver<TokioConnectionProvider> {
    let dns = fleet.dns_addr();
    let servers = NameServerConfigGroup::from_ips_clear(&[dns.ip()], dns.port(), true);
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    options.timeout = timeout;
    options.attempts = 0;
    Resolver::builder_with_config(
        ResolverConfig::from_parts(None, vec![], servers),
        TokioConnectionProvider::default(),
    )
    .with_options(options)
    .build()
}

/// The TXT records at `_mta-sts.<domain>`, each as its list of character-strings.
async fn txt(
    fleet: &Fleet,
    domain: &str,
) -> Result<Vec<Vec<String>>, hickory_resolver::ResolveError> {
    let lookup =
        resolver(fleet, Duration::from_secs(2)).txt_lookup(format!("_mta-sts.{domain}.")).await?;
    let mut records: Vec<Vec<String>> = lookup
        .iter()
        .map(|t| t.txt_data().iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect())
        .collect();
    records.sort();
    Ok(records)
}

/// What the responder answered: the status, the head lines, the raw body bytes.
#[derive(Debug)]
struct Response {
    status: u16,
    head: Vec<String>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.iter().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then_some(v.trim())
        })
    }
}

/// GETs `path` from `mta-sts.<domain>` through the fleet's responder, trusting only the test
/// CA. `Ok(None)`: the server closed without a response.
async fn get(fleet: &Fleet, domain: &str, path: &str) -> Result<Option<Response>, std::io::Error> {
    let host = format!("mta-sts.{domain}");
    let tcp = TcpStream::connect(fleet.sts_https_addr()).await?;
    let connector = TlsConnector::from(support::verifying_config());
    let mut tls = connector.connect(ServerName::try_from(host.clone()).unwrap(), tcp).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut bytes = Vec::new();
    tls.read_to_end(&mut bytes).await?;
    if bytes.is_empty() {
        return Ok(None);
    }
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head: Vec<String> = String::from_utf8(bytes[..split].to_vec())
        .unwrap()
        .split("\r\n")
        .map(str::to_owned)
        .collect();
    let status = head[0].split(' ').nth(1).unwrap().parse().unwrap();
    Ok(Some(Response { status, head, body: bytes[split + 4..].to_vec() }))
}

async fn get_policy(fleet: &Fleet, domain: &str) -> Response {
    get(fleet, domain, WELL_KNOWN_PATH).await.unwrap().unwrap()
}

/// The rustls error inside a failed handshake.
fn tls_error(error: &std::io::Error) -> &rustls::Error {
    error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).unwrap()
}

// --- DNS -----------------------------------------------------------------------------------

/// RFC 8461 §3.1: "Senders MUST concatenate these [character-strings] together" — and the
/// sender must see every record (two `v=STSv1` records are an error it has to detect).
#[tokio::test]
async fn txt_records_are_served_each_with_its_character_strings() {
    let knobs = StsKnobs {
        txt: vec![
            TxtRecord::split(["v=STSv1; ", "id=20260101;"]),
            "v=STSv1; id=2;".into(),
            "unrelated".into(),
        ],
        ..StsKnobs::default()
    };
    let fleet = sts_fleet(&[("a.sim.test", knobs)]).await;
    let records = txt(&fleet, "a.sim.test").await.unwrap();
    assert_eq!(
        records,
        vec![
            vec!["unrelated".to_owned()],
            vec!["v=STSv1; ".to_owned(), "id=20260101;".to_owned()],
            vec!["v=STSv1; id=2;".to_owned()],
        ]
    );
    // No `https`: the policy host does not exist.
    let error = resolver(&fleet, Duration::from_secs(2))
        .ipv4_lookup("mta-sts.a.sim.test.")
        .await
        .unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
}

#[tokio::test]
async fn the_policy_host_resolves_to_the_responder_and_a_txt_longer_than_255_is_split() {
    let long = format!("v=STSv1; id={};", "9".repeat(300));
    let knobs = StsKnobs { txt: vec![long.as_str().into()], ..https(HttpsKnobs::policy(POLICY)) };
    let fleet = sts_fleet(&[("a.sim.test", knobs)]).await;
    let records = txt(&fleet, "a.sim.test").await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].iter().map(String::len).collect::<Vec<_>>(), vec![255, long.len() - 255]);
    assert_eq!(records[0].concat(), long);
    let a =
        resolver(&fleet, Duration::from_secs(2)).ipv4_lookup("mta-sts.a.sim.test.").await.unwrap();
    assert_eq!(
        a.iter().map(|a| IpAddr::V4(a.0)).collect::<Vec<_>>(),
        vec![fleet.sts_https_addr().ip()]
    );
    assert_eq!(fleet.sts_https_addr().ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    // The name exists, so other types get an empty answer, not NXDOMAIN.
    let error = resolver(&fleet, Duration::from_secs(2))
        .txt_lookup("mta-sts.a.sim.test.")
        .await
        .unwrap_err();
    assert!(error.is_no_records_found() && !error.is_nx_domain(), "{error:?}");
}

/// A scenario domain gets STS from the options without losing its MX; a domain without an
/// STS set-up has no `_mta-sts` record (the "no-record" case).
#[tokio::test]
async fn options_attach_sts_to_a_scenario_domain_and_others_have_none() {
    let fleet = Fleet::start(FleetOptions {
        scenarios: Some(vec!["CAP-01".to_owned(), "CAP-02".to_owned()]),
        timing: Timing::fast(),
        ca: Some(support::ca()),
        sts: BTreeMap::from([("cap-01.sim.test".to_owned(), StsKnobs::serving("7", POLICY))]),
        ..FleetOptions::default()
    })
    .await
    .unwrap();
    assert!(
        fleet.scenarios().iter().all(|s| s.sts.is_none()),
        "catalogue scenarios publish nothing"
    );
    assert_eq!(
        txt(&fleet, "cap-01.sim.test").await.unwrap(),
        vec![vec!["v=STSv1; id=7;".to_owned()]]
    );
    let resolver = resolver(&fleet, Duration::from_secs(2));
    let mx = resolver.mx_lookup("cap-01.sim.test.").await.unwrap();
    assert_eq!(mx.iter().count(), 1);
    let error = txt(&fleet, "cap-02.sim.test").await.unwrap_err();
    assert!(error.is_nx_domain(), "{error:?}");
    assert_eq!(get_policy(&fleet, "cap-01.sim.test").await.body, POLICY.as_bytes());
}

#[tokio::test]
async fn txt_lookup_can_fail_with_servfail() {
    let knobs = StsKnobs { txt_fault: Some(TxtFault::ServFail), ..StsKnobs::serving("1", POLICY) };
    let fleet = sts_fleet(&[("a.sim.test", knobs)]).await;
    let error = txt(&fleet, "a.sim.test").await.unwrap_err();
    let kind = error.proto().map(|p| p.kind().clone());
    assert!(
        matches!(
            kind,
            Some(ProtoErrorKind::NoRecordsFound { response_code: ResponseCode::ServFail, .. })
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn txt_lookup_can_time_out() {
    let knobs = StsKnobs { txt_fault: Some(TxtFault::Timeout), ..StsKnobs::serving("1", POLICY) };
    let fleet = sts_fleet(&[("a.sim.test", knobs)]).await;
    let error = resolver(&fleet, Duration::from_millis(300))
        .txt_lookup("_mta-sts.a.sim.test.")
        .await
        .unwrap_err();
    let kind = error.proto().map(|p| p.kind().clone());
    assert!(matches!(kind, Some(ProtoErrorKind::Timeout)), "{error:?}");
    // The policy host is unaffected.
    assert_eq!(get_policy(&fleet, "a.sim.test").await.status, 200);
}

/// RFC 8461 §3.3: a changed `id` must be seen by the next lookup (TTL 0), while the fleet runs.
#[tokio::test]
async fn set_sts_changes_the_record_and_the_policy_at_run_time() {
    let fleet = sts_fleet(&[("a.sim.test", StsKnobs::serving("1", POLICY))]).await;
    assert_eq!(txt(&fleet, "a.sim.test").await.unwrap(), vec![vec!["v=STSv1; id=1;".to_owned()]]);
    let mut next = StsKnobs::serving("2", "version: STSv1\nmode: none\nmax_age: 60\n");
    next.https.as_mut().unwrap().status = 503;
    fleet.set_sts("a.sim.test", next).await.unwrap();
    assert_eq!(txt(&fleet, "a.sim.test").await.unwrap(), vec![vec!["v=STSv1; id=2;".to_owned()]]);
    assert_eq!(get_policy(&fleet, "a.sim.test").await.status, 503);
    fleet.set_sts("a.sim.test", StsKnobs::none()).await.unwrap();
    assert!(fleet.sts("a.sim.test").is_none());
    assert!(txt(&fleet, "a.sim.test").await.unwrap_err().is_nx_domain());
}

// --- HTTPS ---------------------------------------------------------------------------------

#[tokio::test]
async fn a_good_policy_is_served_as_text_plain_with_content_length() {
    let fleet = sts_fleet(&[("a.sim.test", https(HttpsKnobs::policy(POLICY)))]).await;
    let response = get_policy(&fleet, "a.sim.test").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("content-type"), Some("text/plain"));
    assert_eq!(response.header("content-length"), Some(POLICY.len().to_string().as_str()));
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.body, POLICY.as_bytes());
}

#[tokio::test]
async fn status_content_type_and_body_are_knobs() {
    let odd = HttpsKnobs {
        status: 500,
        content_type: Some("text/html; charset=utf-8".to_owned()),
        body: vec![0xff, b'\n', 0x00],
        ..HttpsKnobs::default()
    };
    let bare = HttpsKnobs { content_type: None, ..HttpsKnobs::policy(POLICY) };
    let fleet = sts_fleet(&[("odd.sim.test", https(odd)), ("bare.sim.test", https(bare))]).await;
    let response = get_policy(&fleet, "odd.sim.test").await;
    assert_eq!(response.status, 500);
    assert_eq!(response.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(response.body, vec![0xff, b'\n', 0x00]);
    let response = get_policy(&fleet, "bare.sim.test").await;
    assert_eq!((response.status, response.header("content-type")), (200, None));
}

/// RFC 8461 §3.3: "HTTP 3xx redirects MUST NOT be followed" — so the simulator must be able
/// to send one.
#[tokio::test]
async fn a_redirect_carries_its_location() {
    let knobs = HttpsKnobs {
        status: 301,
        location: Some("https://mta-sts.b.sim.test/.well-known/mta-sts.txt".to_owned()),
        ..HttpsKnobs::default()
    };
    let fleet = sts_fleet(&[("a.sim.test", https(knobs))]).await;
    let response = get_policy(&fleet, "a.sim.test").await;
    assert_eq!(response.status, 301);
    assert!(response.head[0].starts_with("HTTP/1.1 301 "), "{:?}", response.head);
    assert_eq!(
        response.header("location"),
        Some("https://mta-sts.b.sim.test/.well-known/mta-sts.txt")
    );
}

#[tokio::test]
async fn a_chunked_body_decodes_to_the_policy() {
    let knobs = HttpsKnobs { framing: Framing::Chunked(10), ..HttpsKnobs::policy(POLICY) };
    let fleet = sts_fleet(&[("a.sim.test", https(knobs))]).await;
    let response = get_policy(&fleet, "a.sim.test").await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert_eq!(response.header("content-length"), None);
    let mut body = response.body.as_slice();
    let mut decoded = Vec::new();
    let mut chunks = 0;
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..line_end]).unwrap(), 16).unwrap();
        body = &body[line_end + 2..];
        if size == 0 {
            assert_eq!(body, b"\r\n");
            break;
        }
        assert!(size <= 10);
        decoded.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n");
        body = &body[size + 2..];
        chunks += 1;
    }
    assert_eq!(decoded, POLICY.as_bytes());
    assert_eq!(chunks, POLICY.len().div_ceil(10));
}

#[tokio::test]
async fn a_slow_server_answers_after_its_delay() {
    let delay = Duration::from_millis(400);
    let knobs = HttpsKnobs { delay, ..HttpsKnobs::policy(POLICY) };
    let fleet = sts_fleet(&[("a.sim.test", https(knobs))]).await;
    let started = Instant::now();
    let response = get_policy(&fleet, "a.sim.test").await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(response.body, POLICY.as_bytes());
}

#[tokio::test]
async fn close_without_reply_sends_nothing_but_logs_the_request() {
    let knobs = HttpsKnobs { close_without_reply: true, ..HttpsKnobs::policy(POLICY) };
    let fleet = sts_fleet(&[("a.sim.test", https(knobs))]).await;
    assert!(get(&fleet, "a.sim.test", WELL_KNOWN_PATH).await.unwrap().is_none());
    let transcript = fleet.transcripts().settled("a.sim.test", Duration::from_secs(5)).await;
    assert_eq!(transcript.policy_fetches(), 1);
    let events = &transcript.connections[0].events;
    assert!(!events.iter().any(|e| matches!(e, Event::HttpResponse { .. })), "{events:?}");
    assert_eq!(events.last(), Some(&Event::Closed));
}

/// The certificate of `mta-sts.<domain>` must be valid for that name (RFC 8461 §3.3): each
/// bad kind fails a verifying client with the matching rustls error.
#[tokio::test]
async fn the_certificate_kind_is_a_knob() {
    let with = |cert| https(HttpsKnobs { cert, ..HttpsKnobs::policy(POLICY) });
    let fleet = sts_fleet(&[
        ("valid.sim.test", with(CertKind::Valid)),
        ("expired.sim.test", with(CertKind::Expired)),
        ("wrong.sim.test", with(CertKind::WrongHost)),
        ("self.sim.test", with(CertKind::SelfSigned)),
    ])
    .await;
    assert_eq!(get_policy(&fleet, "valid.sim.test").await.status, 200);
    let cases = [
        ("expired.sim.test", rustls::CertificateError::Expired),
        ("wrong.sim.test", rustls::CertificateError::NotValidForName),
        ("self.sim.test", rustls::CertificateError::UnknownIssuer),
    ];
    for (domain, expected) in cases {
        let error = get(&fleet, domain, WELL_KNOWN_PATH).await.unwrap_err();
        match tls_error(&error) {
            rustls::Error::InvalidCertificate(found) => {
                let same = std::mem::discriminant(found) == std::mem::discriminant(&expected)
                    || matches!(
                        (found, &expected),
                        (
                            rustls::CertificateError::ExpiredContext { .. },
                            rustls::CertificateError::Expired
                        ) | (
                            rustls::CertificateError::NotValidForNameContext { .. },
                            rustls::CertificateError::NotValidForName
                        )
                    );
                assert!(same, "{domain}: {found:?}, expected {expected:?}");
            }
            other => panic!("{domain}: {other:?}"),
        }
    }
}

/// An SNI the fleet does not serve gets no handshake at all.
#[tokio::test]
async fn an_unknown_policy_host_gets_no_handshake() {
    let fleet = sts_fleet(&[("a.sim.test", https(HttpsKnobs::policy(POLICY)))]).await;
    assert!(get(&fleet, "nobody.sim.test", WELL_KNOWN_PATH).await.is_err());
    assert!(fleet.transcript("nobody.sim.test").connections.is_empty());
}

/// RFC 8461 §3.3: the policy lives at one path; the responder answers 404 elsewhere, and the
/// transcript counts only policy fetches (RFC 8461 §3.3 limits how often a sender refetches).
#[tokio::test]
async fn other_paths_get_404_and_the_transcript_counts_fetches() {
    let fleet = sts_fleet(&[("a.sim.test", https(HttpsKnobs::policy(POLICY)))]).await;
    for _ in 0..3 {
        assert_eq!(get_policy(&fleet, "a.sim.test").await.status, 200);
    }
    for path in ["/", "/.well-known/mta-sts.txt.bak", "/mta-sts.txt"] {
        assert_eq!(get(&fleet, "a.sim.test", path).await.unwrap().unwrap().status, 404, "{path}");
    }
    let transcript = fleet.transcripts().settled("a.sim.test", Duration::from_secs(5)).await;
    assert_eq!(transcript.policy_fetches(), 3);
    assert_eq!(transcript.http_requests().len(), 6);
    assert_eq!(transcript.smtp().count(), 0);
    for connection in &transcript.connections {
        assert_eq!(connection.service, Service::MtaStsHttps);
        assert_eq!(connection.mx, "mta-sts.a.sim.test");
        assert!(connection.tls_established());
        assert!(connection.events.iter().any(|e| matches!(
            e,
            Event::HttpRequest { host: Some(h), .. } if h == "mta-sts.a.sim.test"
        )));
    }
    assert!(postwarden_sim::check("STS", &transcript, true).is_empty());
}
