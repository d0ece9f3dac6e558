//! Domain-name matching shared by policies.
//!
//! Tables keyed by domain (Postfix maps, forced-TLS lists) follow one convention: `example.com`
//! matches that domain only, `.example.com` matches every subdomain of it (Postfix's
//! `smtp_tls_policy_maps` semantics, where parent-domain matching is off). Lookups try the most
//! specific key first, so the table needs no ordering and each decision costs one lookup per
//! label.

/// Normalises a domain for lookups: lower-case, no trailing dot.
pub fn normalize(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

/// The keys to look up for `domain`, most specific first: the domain itself, then `.parent` for
/// every parent domain (`a.b.example` gives `a.b.example`, `.b.example`, `.example`).
pub fn lookup_keys(domain: &str) -> impl Iterator<Item = &str> {
    let domain = domain.trim_end_matches('.');
    std::iter::once(domain).chain(domain.match_indices('.').map(move |(i, _)| &domain[i..]))
}

/// Whether a certificate-style pattern (`example.com`, `.example.com` for any subdomain) matches
/// `name`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let name = name.trim_end_matches('.');
    match pattern.strip_prefix('.') {
        Some(suffix) => {
            name.len() > suffix.len()
                && name[name.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
        }
        None => pattern.trim_end_matches('.').eq_ignore_ascii_case(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_keys_go_from_specific_to_general() {
        let keys: Vec<_> = lookup_keys("a.b.example").collect();
        assert_eq!(keys, ["a.b.example", ".b.example", ".example"]);
        let keys: Vec<_> = lookup_keys("example.").collect();
        assert_eq!(keys, ["example"]);
    }

    #[test]
    fn patterns() {
        assert!(pattern_matches("example.com", "EXAMPLE.com."));
        assert!(!pattern_matches("example.com", "mx.example.com"));
        assert!(pattern_matches(".example.com", "mx.example.com"));
        assert!(!pattern_matches(".example.com", "example.com"));
        assert!(!pattern_matches(".example.com", "mxexample.com"));
    }
}
