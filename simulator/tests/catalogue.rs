//! The catalogue as data: size, uniqueness, coverage of every research section, and the
//! expectations that follow from the invariants (no plaintext under a forced policy).

use std::collections::HashSet;

use postwarden_sim::scenario::{MxRole, Outcome, Policy, Section};
use postwarden_sim::{CertKind, catalogue};

#[test]
fn at_least_forty_scenarios_with_unique_ids_labels_and_domains() {
    let all = catalogue();
    assert!(all.len() >= 40, "only {} scenarios", all.len());
    let ids: HashSet<_> = all.iter().map(|s| s.id).collect();
    let labels: HashSet<_> = all.iter().map(|s| s.label.clone()).collect();
    let domains: HashSet<_> = all.iter().map(|s| s.domain()).collect();
    assert_eq!(ids.len(), all.len(), "duplicate id");
    assert_eq!(labels.len(), all.len(), "duplicate label");
    assert_eq!(domains.len(), all.len(), "duplicate domain");
    for s in &all {
        assert!(
            s.label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{} is not a DNS label",
            s.label
        );
        assert!(s.domain().ends_with(".sim.test"));
        assert!(!s.description.is_empty() && !s.source.is_empty(), "{} undocumented", s.id);
    }
}

#[test]
fn every_research_section_is_represented() {
    let all = catalogue();
    for section in Section::ALL {
        assert!(
            all.iter().any(|s| s.sections.contains(&section)),
            "no scenario for §{} {section:?}",
            section.number()
        );
    }
    for prefix in
        ["CAP-", "STL-", "HS-", "CERT-", "GRT-", "EHLO-", "MAIL-", "RCPT-", "DATA-", "EOD-"]
    {
        assert!(all.iter().any(|s| s.id.starts_with(prefix)), "no {prefix} scenario");
    }
    for prefix in ["NET-", "TIME-", "PARSE-", "MX-", "INJ-", "AUTH-"] {
        assert!(all.iter().any(|s| s.id.starts_with(prefix)), "no {prefix} scenario");
    }
    let injections = all.iter().filter(|s| s.sections.contains(&Section::Injection)).count();
    assert!(injections >= 5, "research §3.2 lists five injection variants");
}

fn allows_plaintext(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Plain | Outcome::PlainReconnect => true,
        Outcome::Split(parts) => parts.iter().any(|(_, o)| allows_plaintext(o)),
        Outcome::AnyOf(options) => options.iter().any(allows_plaintext),
        Outcome::Tls | Outcome::Defer { .. } | Outcome::Bounce => false,
    }
}

#[test]
fn forced_policies_never_expect_plaintext() {
    for s in catalogue() {
        for policy in [Policy::Forced, Policy::ForcedVerify] {
            assert!(!allows_plaintext(&s.expected.outcome(policy)), "{} {policy:?}", s.id);
        }
    }
}

#[test]
fn certificate_problems_only_change_the_verifying_policy() {
    for s in catalogue().iter().filter(|s| s.id.starts_with("CERT-")) {
        assert_eq!(s.expected.opportunistic, Outcome::Tls, "{}", s.id);
        assert_eq!(s.expected.forced, Outcome::Tls, "{}", s.id);
    }
    assert!(CertKind::Valid.verifies() && !CertKind::Expired.verifies());
}

#[test]
fn mx_layouts_are_consistent() {
    for s in catalogue() {
        assert!(!s.mx.is_empty(), "{} has no MX", s.id);
        let names: HashSet<_> = s.mx.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), s.mx.len(), "{} repeats an MX name", s.id);
        for policy in Policy::ALL {
            if let Some(via) = s.expected.via(policy) {
                let mx = s.mx.iter().find(|m| m.name == via);
                assert!(mx.is_some_and(|m| m.role != MxRole::Refuse), "{} via {via}", s.id);
            }
        }
    }
    let multi = catalogue().into_iter().filter(|s| s.mx.len() > 1).count();
    assert!(multi >= 4, "multi-MX scenarios: {multi}");
}

#[test]
fn outcomes_display_in_the_research_vocabulary() {
    assert_eq!(Outcome::PlainReconnect.to_string(), "PLAIN*");
    assert_eq!(Outcome::DEFER_NO_TLS.to_string(), "DEFER 4.7.4");
    assert!(Outcome::DEFER.accepts(&Outcome::DEFER_TLS_FAILED));
    assert!(!Outcome::DEFER_NO_TLS.accepts(&Outcome::DEFER_TLS_FAILED));
    assert!(Outcome::AnyOf(&[Outcome::Tls, Outcome::PlainReconnect]).accepts(&Outcome::Tls));
}
