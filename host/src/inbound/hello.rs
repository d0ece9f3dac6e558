//! What a client's first TLS record says about the versions it can speak, read before rustls
//! sees it.
//!
//! rustls refuses a client that offers only TLS 1.1 or older, but such a client sends no
//! `signature_algorithms` extension, so rustls fails on that first and answers with a bare
//! `handshake_failure` alert: the client's operator reads "handshake failure" and looks at
//! certificates and ciphers. RFC 8446 §4.2.1 and RFC 5246 Appendix E name the right answer,
//! `protocol_version`. So the server peeks at the ClientHello and, for a client that can only
//! speak an old version, sends that alert itself and logs why. Anything it cannot read here
//! (fragmented, odd, or simply modern) goes to rustls unchanged.

/// The verdict on the bytes received so far.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Hello {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// The client offers only this legacy version (e.g. `0x0302`, TLS 1.1) or older, and no
    /// `supported_versions` extension.
    LegacyOnly(u16),
    /// Anything else: rustls decides.
    Other,
}

/// The alert a server sends to a client that offers no version it supports: a fatal
/// (`2`) `protocol_version` (`70`) alert in a TLS 1.0 record, which any version can read.
pub const PROTOCOL_VERSION_ALERT: [u8; 7] = [0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46];

/// TLS 1.2's version number; anything below is legacy.
const TLS12: u16 = 0x0303;
/// `supported_versions` (RFC 8446 §4.2.1): a client that sends it is judged by rustls.
const SUPPORTED_VERSIONS: u16 = 43;

/// Reads the ClientHello at the start of `bytes` (the first TLS record, as peeked).
pub fn classify(bytes: &[u8]) -> Hello {
    let Some(header) = bytes.get(..5) else {
        return Hello::NeedMore;
    };
    // A handshake record; its length, within the 16 KiB a record may carry.
    if header[0] != 0x16 {
        return Hello::Other;
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if len > 16_384 {
        return Hello::Other;
    }
    let Some(record) = bytes.get(5..5 + len) else {
        return Hello::NeedMore;
    };
    client_hello(record).unwrap_or(Hello::Other)
}

/// The ClientHello inside one record; `None` when it does not parse as one (rustls then says
/// what is wrong with it).
fn client_hello(record: &[u8]) -> Option<Hello> {
    let mut r = Reader(record);
    if r.u8()? != 0x01 {
        return None;
    }
    let body_len = r.u24()?;
    let mut body = Reader(r.take(body_len)?);
    let version = body.u16()?;
    body.take(32)?; // random
    let session_id = usize::from(body.u8()?);
    body.take(session_id)?;
    let suites = usize::from(body.u16()?);
    body.take(suites)?;
    let compression = usize::from(body.u8()?);
    body.take(compression)?;
    if version >= TLS12 {
        return Some(Hello::Other);
    }
    // No extensions at all is a legacy client too (SSL 3.0 style).
    if body.0.is_empty() {
        return Some(Hello::LegacyOnly(version));
    }
    let extensions_len = usize::from(body.u16()?);
    let mut extensions = Reader(body.take(extensions_len)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let len = usize::from(extensions.u16()?);
        extensions.take(len)?;
        if kind == SUPPORTED_VERSIONS {
            return Some(Hello::Other);
        }
    }
    Some(Hello::LegacyOnly(version))
}

/// A cursor that never reads past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// `TLS 1.1` for `0x0302`, and so on.
pub fn version_name(version: u16) -> String {
    match version {
        0x0300 => "SSL 3.0".to_owned(),
        0x0301 => "TLS 1.0".to_owned(),
        0x0302 => "TLS 1.1".to_owned(),
        other => format!("version 0x{other:04x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record with `version` and the given extensions (type, data).
    fn hello(version: u16, extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend([0, 2, 0x00, 0x2f]); // one suite
        body.extend([1, 0]); // null compression
        let mut ext = Vec::new();
        for (kind, data) in extensions {
            ext.extend(kind.to_be_bytes());
            ext.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
            ext.extend(*data);
        }
        if !extensions.is_empty() {
            body.extend(u16::try_from(ext.len()).unwrap().to_be_bytes());
            body.extend(ext);
        }
        let mut handshake = vec![1];
        handshake.extend(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        handshake.extend(body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend(u16::try_from(handshake.len()).unwrap().to_be_bytes());
        record.extend(handshake);
        record
    }

    #[test]
    fn old_clients_are_told_by_version_modern_ones_go_to_rustls() {
        assert_eq!(classify(&hello(0x0302, &[(0, b"\0\0")])), Hello::LegacyOnly(0x0302));
        assert_eq!(classify(&hello(0x0301, &[])), Hello::LegacyOnly(0x0301));
        assert_eq!(classify(&hello(0x0303, &[(13, b"\0\x02\x04\x03")])), Hello::Other);
        // TLS 1.3 clients put 0x0303 in the legacy field; an odd one with 0x0301 and
        // supported_versions is still rustls's to judge.
        assert_eq!(classify(&hello(0x0301, &[(43, b"\x02\x03\x04")])), Hello::Other);
    }

    #[test]
    fn partial_and_foreign_input() {
        let full = hello(0x0302, &[(0, b"\0\0")]);
        for cut in 0..full.len() {
            assert_eq!(classify(&full[..cut]), Hello::NeedMore, "cut at {cut}");
        }
        assert_eq!(classify(b"EHLO x\r\n"), Hello::Other);
        assert_eq!(classify(&[0x16, 3, 1, 0xff, 0xff]), Hello::Other);
        // A record that lies about its contents.
        let mut broken = full.clone();
        broken[6] = 0xff;
        assert_eq!(classify(&broken), Hello::Other);
    }
}
