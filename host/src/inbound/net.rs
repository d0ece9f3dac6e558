//! CIDR blocks (`10.0.0.0/8`, `::1/128`) for the relay access list.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// An IPv4 or IPv6 network: an address and a prefix length.
///
/// The address is stored with its host bits cleared, so `10.1.2.3/8` and `10.0.0.0/8` are the
/// same network and print as `10.0.0.0/8`. An IPv4 network never contains an IPv6 address;
/// callers map `::ffff:a.b.c.d` peers to IPv4 first (see
/// [`InboundOptions::relay_allowed`](super::InboundOptions::relay_allowed)).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// The network of `addr` with `prefix` leading bits; host bits are cleared.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(IpNetError::PrefixTooLong { prefix, max });
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask_v4(prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask_v6(prefix))),
        };
        Ok(IpNet { addr, prefix })
    }

    /// `127.0.0.0/8` and `::1/128`, the default relay networks.
    pub fn loopback() -> [IpNet; 2] {
        [
            IpNet { addr: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), prefix: 8 },
            IpNet { addr: IpAddr::V6(Ipv6Addr::LOCALHOST), prefix: 128 },
        ]
    }

    /// The network address (host bits cleared).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside the network. Families never mix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & mask_v4(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & mask_v6(self.prefix) == u128::from(net)
            }
            _ => false,
        }
    }
}

fn mask_v4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask_v6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Parses `addr/prefix`; a bare address is a single host (`/32` or `/128`).
impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.parse().map_err(|_| IpNetError::BadAddress { text: s.to_owned() })?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse().map_err(|_| IpNetError::BadPrefix { text: s.to_owned() })?
            }
            Some(_) => return Err(IpNetError::BadPrefix { text: s.to_owned() }),
        };
        IpNet::new(addr, prefix)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Reads the `"10.0.0.0/8"` form, so a config file can hold a list of strings.
impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a network did not parse.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum IpNetError {
    /// The part before `/` is not an IP address.
    #[error("`{text}`: not an IP address or CIDR block")]
    BadAddress {
        /// The whole input.
        text: String,
    },
    /// The part after `/` is not a number.
    #[error("`{text}`: the prefix length is not a number")]
    BadPrefix {
        /// The whole input.
        text: String,
    },
    /// The prefix is longer than the address.
    #[error("prefix length {prefix} is longer than the address ({max} bits)")]
    PrefixTooLong {
        /// The prefix given.
        prefix: u8,
        /// 32 or 128.
        max: u8,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_and_matches_ipv4() {
        let n = net("10.1.2.3/8");
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(n.contains(ip("10.255.0.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(!n.contains(ip("::ffff:10.0.0.1")), "families never mix");
        assert!(net("0.0.0.0/0").contains(ip("192.0.2.1")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
    }

    #[test]
    fn parses_and_matches_ipv6() {
        let n = net("2001:db8::/32");
        assert!(n.contains(ip("2001:db8:1::5")));
        assert!(!n.contains(ip("2001:db9::5")));
        assert!(net("::1/128").contains(ip("::1")));
        assert!(net("::/0").contains(ip("fe80::1")));
        assert!(!net("::/0").contains(ip("127.0.0.1")));
    }

    #[test]
    fn refuses_bad_input() {
        for bad in ["", "10.0.0.0/33", "::1/129", "10.0.0.0/", "10.0.0.0/x", "x/8", "10.0.0/8"] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert!("10.0.0.0/+8".parse::<IpNet>().is_err());
    }
}
