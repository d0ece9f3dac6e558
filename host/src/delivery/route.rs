//! Where to deliver a domain's mail: static routes, then MX records, then the implicit MX.
//!
//! RFC 5321 §5.1: look up MX records; if there are none, the domain itself is the implicit MX
//! (A/AAAA). A single MX of `.` with preference 0 is a null MX (RFC 7505): the domain accepts no
//! mail, so its messages bounce at once. Hosts are tried by preference; equal preferences are
//! shuffled (RFC 5321 §5.1 asks for load spreading) with a seedable generator, so tests are
//! deterministic.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Mutex;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

/// A boxed future, for the object-safe resolver trait.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// MX records: (preference, exchange).
pub type MxRecords = Vec<(u16, String)>;

/// What a resolver lookup returns: the answer, or why the lookup failed (temporary).
pub type LookupResult<T> = Result<Lookup<T>, String>;

/// One host to try, with its addresses.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MxHost {
    /// Host name, lower-case, without the trailing dot.
    pub name: String,
    /// MX preference (0 for static routes and the implicit MX).
    pub preference: u16,
    /// Addresses to connect to, in order, with the port.
    pub addrs: Vec<SocketAddr>,
}

/// Why no route could be found.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// The domain publishes a null MX (RFC 7505): permanent.
    #[error("{0} does not accept mail (null MX, RFC 7505)")]
    NullMx(String),
    /// The domain does not exist: permanent.
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    /// No MX and no address records: permanent.
    #[error("no MX or address records for {0}")]
    NoAddress(String),
    /// DNS failed in a way that may heal: temporary.
    #[error("DNS lookup for {name} failed: {reason}")]
    Temporary {
        /// The name looked up.
        name: String,
        /// Why.
        reason: String,
    },
}

impl RouteError {
    /// Whether retrying later may help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, RouteError::Temporary { .. })
    }

    /// The enhanced status code for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            RouteError::NullMx(_) => "5.1.10",
            RouteError::NoSuchDomain(_) => "5.1.2",
            RouteError::NoAddress(_) => "5.4.4",
            RouteError::Temporary { .. } => "4.4.3",
        }
    }
}

/// What a lookup found for a name.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Lookup<T> {
    /// Records.
    Found(T),
    /// The name exists but has no records of this type.
    NoRecords,
    /// The name does not exist.
    NoSuchName,
}

/// DNS as delivery needs it. Production uses hickory; tests may use a map.
pub trait Resolve: Send + Sync {
    /// MX records of `domain`: (preference, exchange without trailing dot).
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, LookupResult<MxRecords>>;
    /// Addresses of `host` (A and AAAA).
    fn addrs<'a>(&'a self, host: &'a str) -> BoxFuture<'a, LookupResult<Vec<IpAddr>>>;
    /// TXT records of `name`, each record's character-strings joined (RFC 7208 §3.3 style;
    /// invalid UTF-8 replaced), as MTA-STS and TLS-RPT read them.
    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, LookupResult<Vec<String>>>;
}

/// hickory-resolver with configurable name servers (tests point it at the simulator's DNS).
pub struct HickoryResolver {
    resolver: TokioResolver,
}

impl HickoryResolver {
    /// A resolver using `servers` (UDP and TCP), or the system configuration when empty.
    pub fn new(servers: &[SocketAddr]) -> Result<Self, String> {
        let mut opts = ResolverOpts::default();
        opts.attempts = 2;
        opts.timeout = std::time::Duration::from_secs(5);
        opts.cache_size = 1024;
        let builder = if servers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| format!("system DNS configuration: {e}"))?
        } else {
            let mut group = NameServerConfigGroup::new();
            for server in servers {
                group.merge(NameServerConfigGroup::from_ips_clear(
                    &[server.ip()],
                    server.port(),
                    true,
                ));
            }
            let config = ResolverConfig::from_parts(None, vec![], group);
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        };
        Ok(HickoryResolver { resolver: builder.with_options(opts).build() })
    }
}

impl Resolve for HickoryResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, LookupResult<MxRecords>> {
        Box::pin(async move {
            match self.resolver.mx_lookup(fqdn(domain)).await {
                Ok(lookup) => Ok(Lookup::Found(
                    lookup
                        .iter()
                        .map(|mx| (mx.preference(), normalize(&mx.exchange().to_ascii())))
                        .collect(),
                )),
                Err(e) if e.is_nx_domain() => Ok(Lookup::NoSuchName),
                Err(e) if e.is_no_records_found() => Ok(Lookup::NoRecords),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn addrs<'a>(&'a self, host: &'a str) -> BoxFuture<'a, LookupResult<Vec<IpAddr>>> {
        Box::pin(async move {
            match self.resolver.lookup_ip(fqdn(host)).await {
                Ok(lookup) => Ok(Lookup::Found(lookup.iter().collect())),
                Err(e) if e.is_nx_domain() => Ok(Lookup::NoSuchName),
                Err(e) if e.is_no_records_found() => Ok(Lookup::NoRecords),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, LookupResult<Vec<String>>> {
        Box::pin(async move {
            match self.resolver.txt_lookup(fqdn(name)).await {
                Ok(lookup) => Ok(Lookup::Found(
                    lookup
                        .iter()
                        .map(|txt| {
                            let joined: Vec<u8> = txt.txt_data().concat();
                            String::from_utf8_lossy(&joined).into_owned()
                        })
                        .collect(),
                )),
                Err(e) if e.is_nx_domain() => Ok(Lookup::NoSuchName),
                Err(e) if e.is_no_records_found() => Ok(Lookup::NoRecords),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

/// Turns a domain into its ordered list of hosts to try.
pub struct Router {
    resolver: Box<dyn Resolve>,
    static_routes: HashMap<String, (String, u16)>,
    port: u16,
    rng: Mutex<StdRng>,
}

impl Router {
    /// A router over `resolver`, connecting to `port` (25 in production), with static routes
    /// (domain → addresses, like Postfix transport maps) and a seed for shuffling equal
    /// preferences (`None`: from entropy).
    pub fn new(
        resolver: Box<dyn Resolve>,
        port: u16,
        static_routes: HashMap<String, (String, u16)>,
        seed: Option<u64>,
    ) -> Self {
        let rng = match seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_entropy(),
        };
        Router { resolver, static_routes, port, rng: Mutex::new(rng) }
    }

    /// The resolver routes are looked up with (MTA-STS asks it too).
    pub fn resolver(&self) -> &dyn Resolve {
        &*self.resolver
    }

    /// Whether `domain` goes over a static route: then its own published policies (MTA-STS)
    /// say nothing about the hop (research §3.6).
    pub fn is_static(&self, domain: &str) -> bool {
        self.static_routes.contains_key(&normalize(domain))
    }

    /// The hosts to try for `domain`, in order.
    pub async fn route(&self, domain: &str) -> Result<Vec<MxHost>, RouteError> {
        let domain = normalize(domain);
        let temporary = |reason: String| RouteError::Temporary { name: domain.clone(), reason };
        if let Some((host, port)) = self.static_routes.get(&domain) {
            let addrs = match host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, *port)],
                Err(_) => match self.resolver.addrs(host).await.map_err(temporary)? {
                    Lookup::Found(ips) if !ips.is_empty() => {
                        ips.into_iter().map(|ip| SocketAddr::new(ip, *port)).collect()
                    }
                    _ => return Err(RouteError::NoAddress(host.clone())),
                },
            };
            return Ok(vec![MxHost { name: normalize(host), preference: 0, addrs }]);
        }
        let mut records = match self.resolver.mx(&domain).await.map_err(temporary)? {
            Lookup::NoSuchName => return Err(RouteError::NoSuchDomain(domain)),
            Lookup::NoRecords => vec![(0, domain.clone())],
            Lookup::Found(records) if records.is_empty() => vec![(0, domain.clone())],
            Lookup::Found(records) => records,
        };
        if records.len() == 1 && (records[0].1.is_empty() || records[0].1 == ".") {
            return Err(RouteError::NullMx(domain));
        }
        records.retain(|(_, host)| !host.is_empty() && host != ".");
        self.order(&mut records);

        let mut hosts = Vec::with_capacity(records.len());
        let mut last_error = None;
        for (preference, name) in records {
            match self.resolver.addrs(&name).await {
                Ok(Lookup::Found(ips)) if !ips.is_empty() => {
                    let addrs = ips.into_iter().map(|ip| SocketAddr::new(ip, self.port)).collect();
                    hosts.push(MxHost { name, preference, addrs });
                }
                Ok(_) => last_error = Some(RouteError::NoAddress(name)),
                Err(reason) => last_error = Some(RouteError::Temporary { name, reason }),
            }
        }
        match (hosts.is_empty(), last_error) {
            (false, _) => Ok(hosts),
            (true, Some(RouteError::NoAddress(_)) | None) => Err(RouteError::NoAddress(domain)),
            (true, Some(error)) => Err(error),
        }
    }

    /// Sorts by preference, shuffling runs of equal preference.
    fn order(&self, records: &mut [(u16, String)]) {
        records.sort_by_key(|(preference, _)| *preference);
        let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut start = 0;
        while start < records.len() {
            let end = records[start..]
                .iter()
                .position(|(p, _)| *p != records[start].0)
                .map_or(records.len(), |n| start + n);
            records[start..end].shuffle(&mut *rng);
            start = end;
        }
    }
}

fn fqdn(name: &str) -> String {
    format!("{}.", name.trim_end_matches('.'))
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// A resolver backed by maps, for tests and for routes known in advance.
#[derive(Debug, Default)]
pub struct StaticResolver {
    /// Domain → MX records.
    pub mx: HashMap<String, Vec<(u16, String)>>,
    /// Host → addresses.
    pub hosts: HashMap<String, Vec<IpAddr>>,
    /// Name → TXT records.
    pub txt: HashMap<String, Vec<String>>,
}

impl Resolve for StaticResolver {
    fn mx<'a>(&'a self, domain: &'a str) -> BoxFuture<'a, LookupResult<MxRecords>> {
        let answer = match self.mx.get(domain) {
            Some(records) => Lookup::Found(records.clone()),
            None if self.hosts.contains_key(domain) => Lookup::NoRecords,
            None => Lookup::NoSuchName,
        };
        Box::pin(async move { Ok(answer) })
    }

    fn addrs<'a>(&'a self, host: &'a str) -> BoxFuture<'a, LookupResult<Vec<IpAddr>>> {
        let answer = match self.hosts.get(host) {
            Some(ips) => Lookup::Found(ips.clone()),
            None => Lookup::NoSuchName,
        };
        Box::pin(async move { Ok(answer) })
    }

    fn txt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, LookupResult<Vec<String>>> {
        let answer = match self.txt.get(name) {
            Some(records) => Lookup::Found(records.clone()),
            None => Lookup::NoSuchName,
        };
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(resolver: StaticResolver, seed: u64) -> Router {
        Router::new(Box::new(resolver), 25, HashMap::new(), Some(seed))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[tokio::test]
    async fn mx_by_preference_with_equal_preferences_shuffled_deterministically() {
        let mut r = StaticResolver::default();
        r.mx.insert(
            "example.com".into(),
            vec![
                (20, "c.example.com".into()),
                (10, "a.example.com".into()),
                (10, "b.example.com".into()),
            ],
        );
        for (host, last) in [("a.example.com", 1), ("b.example.com", 2), ("c.example.com", 3)] {
            r.hosts.insert(host.into(), vec![ip(last)]);
        }
        let router = router(r, 7);
        let hosts = router.route("Example.COM.").await.unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[2].name, "c.example.com");
        assert_eq!(hosts[2].addrs, [SocketAddr::new(ip(3), 25)]);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..32 {
            firsts.insert(router.route("example.com").await.unwrap()[0].name.clone());
        }
        assert_eq!(firsts.len(), 2, "equal preferences must be shuffled");
    }

    #[tokio::test]
    async fn implicit_mx_null_mx_and_missing_domains() {
        let mut r = StaticResolver::default();
        r.hosts.insert("implicit.example".into(), vec![ip(9), "::1".parse().unwrap()]);
        r.mx.insert("null.example".into(), vec![(0, ".".into())]);
        r.mx.insert("dangling.example".into(), vec![(10, "nowhere.example".into())]);
        let router = router(r, 1);
        let hosts = router.route("implicit.example").await.unwrap();
        assert_eq!(hosts[0].name, "implicit.example");
        assert_eq!(hosts[0].addrs.len(), 2, "IPv4 and IPv6");
        assert_eq!(
            router.route("null.example").await,
            Err(RouteError::NullMx("null.example".into()))
        );
        assert_eq!(
            router.route("missing.example").await,
            Err(RouteError::NoSuchDomain("missing.example".into()))
        );
        assert_eq!(
            router.route("dangling.example").await,
            Err(RouteError::NoAddress("dangling.example".into()))
        );
    }

    #[tokio::test]
    async fn static_routes_win() {
        let mut routes = HashMap::new();
        routes.insert("example.com".to_owned(), ("10.0.0.5".to_owned(), 2525));
        routes.insert("example.net".to_owned(), ("smarthost.example".to_owned(), 587));
        let mut r = StaticResolver::default();
        r.hosts.insert("smarthost.example".into(), vec![ip(4)]);
        r.mx.insert("example.net".into(), vec![(10, "mx.example.net".into())]);
        let router = Router::new(Box::new(r), 25, routes, Some(1));
        let addr: SocketAddr = "10.0.0.5:2525".parse().unwrap();
        let hosts = router.route("example.com").await.unwrap();
        assert_eq!(hosts, [MxHost { name: "10.0.0.5".into(), preference: 0, addrs: vec![addr] }]);
        let hosts = router.route("example.net").await.unwrap();
        assert_eq!(hosts[0].name, "smarthost.example");
        assert_eq!(hosts[0].addrs, [SocketAddr::new(ip(4), 587)]);
    }
}
