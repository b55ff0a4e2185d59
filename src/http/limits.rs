//! Abuse limits per source (governor, in process) and the client address they key on.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, RateLimiter};
use ipnet::{IpNet, Ipv6Net};

use crate::config::Sources;
use crate::error::IngestError;

struct SourceLimiters {
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    total: Option<DefaultDirectRateLimiter>,
}

/// Every source's limiters, built once from the sources file.
pub struct Limiters {
    by_source: HashMap<String, SourceLimiters>,
    clock: DefaultClock,
}

impl Limiters {
    pub fn new(sources: &Sources) -> Self {
        let by_source = sources
            .iter()
            .map(|s| {
                let limiters = SourceLimiters {
                    per_ip: s.limits.per_ip.map(RateLimiter::keyed),
                    total: s.limits.total.map(RateLimiter::direct),
                };
                (s.id.clone(), limiters)
            })
            .collect();
        Self {
            by_source,
            clock: DefaultClock::default(),
        }
    }

    /// Counts one request from `client` (bucketed by [`rate_key`]) to `source`; refused with the wait until the next
    /// request would be allowed. The per-address limit is checked first so one noisy client
    /// does not use up the source's total.
    pub fn check(&self, source: &str, client: IpAddr) -> Result<(), IngestError> {
        let Some(limiters) = self.by_source.get(source) else {
            return Ok(());
        };
        if let Some(per_ip) = &limiters.per_ip {
            per_ip
                .check_key(&rate_key(client))
                .map_err(|not_until| IngestError::RateLimited {
                    retry_after: not_until.wait_time_from(self.clock.now()),
                    scope: "ip",
                })?;
        }
        if let Some(total) = &limiters.total {
            total
                .check()
                .map_err(|not_until| IngestError::RateLimited {
                    retry_after: not_until.wait_time_from(self.clock.now()),
                    scope: "source",
                })?;
        }
        Ok(())
    }

    /// Forgets addresses whose limit has fully replenished, so memory stays bounded.
    pub fn forget_idle(&self) {
        for limiters in self.by_source.values() {
            if let Some(per_ip) = &limiters.per_ip {
                per_ip.retain_recent();
                per_ip.shrink_to_fit();
            }
        }
    }
}

/// The address of the client: the peer, unless the peer is a trusted proxy, in which case the
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy. Hops may be
/// written with a port (`203.0.113.7:51234`, `[2001:db8::7]:443`) or in brackets; IPv4-mapped
/// IPv6 addresses are read as the IPv4 address they carry, for the peer and every hop.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if !is_trusted_proxy(peer, trusted) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match parse_hop(hop) {
            Some(ip) => {
                client = ip;
                if !is_trusted_proxy(ip, trusted) {
                    break;
                }
            }
            // An unparseable hop ends what we can believe.
            None => break,
        }
    }
    client
}

/// Whether `ip` (read as [`canonical`]) is in one of the `LEADGATE_TRUSTED_PROXIES` networks:
/// the one test of whether a peer's `X-Forwarded-*` headers are believed.
pub fn is_trusted_proxy(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|net| net.contains(&ip))
}

/// One `X-Forwarded-For` entry: an address, with or without a port, IPv6 optionally in
/// brackets (and the whole entry optionally quoted, as `Forwarded` writes it).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim().trim_matches('"');
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
        .or_else(|| hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
        .map(canonical)
}

/// `::ffff:192.0.2.1` is `192.0.2.1`: an IPv4 client seen through a dual-stack socket or a
/// proxy that writes IPv6 is the same client as when seen directly.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The key the per-address limit counts under: an IPv4 address, or the /64 network of an IPv6
/// address. A /64 is what one subscriber, one LAN or one server is given, and any address in
/// it costs its holder nothing to use, so counting single IPv6 addresses would let one client
/// take a fresh budget per request.
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Net::new_assert(v6, 64).trunc().network()),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let ip = client_ip(
            "203.0.113.9".parse().unwrap(),
            Some("1.2.3.4"),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip.to_string(), "203.0.113.9");
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let ip = client_ip(
            "10.0.0.2".parse().unwrap(),
            Some("6.6.6.6, 198.51.100.7, 10.0.0.5"),
            &trusted,
        );
        assert_eq!(ip.to_string(), "198.51.100.7");
    }

    #[test]
    fn a_trusted_peer_without_the_header_is_the_client() {
        let ip = client_ip("10.0.0.2".parse().unwrap(), None, &nets(&["10.0.0.0/8"]));
        assert_eq!(ip.to_string(), "10.0.0.2");
    }

    #[test]
    fn a_trusted_proxy_is_recognised_also_through_a_dual_stack_socket() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        assert!(is_trusted_proxy(ip("10.1.2.3"), &trusted));
        assert!(is_trusted_proxy(ip("::ffff:10.1.2.3"), &trusted));
        assert!(is_trusted_proxy(ip("2001:db8::1"), &trusted));
        assert!(!is_trusted_proxy(ip("203.0.113.9"), &trusted));
        assert!(!is_trusted_proxy(ip("::ffff:203.0.113.9"), &trusted));
        assert!(!is_trusted_proxy(ip("10.1.2.3"), &[]));
    }

    #[test]
    fn garbage_in_the_header_stops_the_walk() {
        let ip = client_ip(
            "10.0.0.2".parse().unwrap(),
            Some("1.1.1.1, garbage"),
            &nets(&["10.0.0.0/8"]),
        );
        assert_eq!(ip.to_string(), "10.0.0.2");
    }

    #[test]
    fn the_per_address_limit_refuses_with_a_wait() {
        let text =
            "[[source]]\nid = \"w\"\nkind = \"form\"\n[source.limits]\nper_ip = \"2/minute\"\n";
        let sources = crate::config::Sources::parse("t.toml", text, |_| None).unwrap();
        let limiters = Limiters::new(&sources);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(limiters.check("w", a).is_ok());
        assert!(limiters.check("w", a).is_ok());
        match limiters.check("w", a) {
            Err(IngestError::RateLimited {
                retry_after,
                scope: "ip",
            }) => {
                assert!(retry_after > Duration::from_secs(20), "{retry_after:?}")
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        assert!(
            limiters.check("w", b).is_ok(),
            "another address has its own budget"
        );
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn forwarded_hops_with_ports_brackets_or_quotes_are_read() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.2");
        for (header, client) in [
            ("198.51.100.7:51234", "198.51.100.7"),
            ("[2001:db8::7]:443", "2001:db8::7"),
            ("[2001:db8::7]", "2001:db8::7"),
            ("2001:db8::7", "2001:db8::7"),
            ("\"[2001:db8::7]:443\"", "2001:db8::7"),
            ("198.51.100.7:51234, 10.0.0.9:80", "198.51.100.7"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("[::ffff:198.51.100.7]:8080", "198.51.100.7"),
        ] {
            assert_eq!(
                client_ip(peer, Some(header), &trusted),
                ip(client),
                "{header}"
            );
        }
    }

    #[test]
    fn an_ipv4_mapped_peer_is_its_ipv4_address_and_trusted_as_such() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(ip("::ffff:203.0.113.9"), None, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), Some("198.51.100.7"), &trusted),
            ip("198.51.100.7"),
            "a proxy reached over a dual-stack socket is still the trusted proxy"
        );
    }

    #[test]
    fn ipv6_clients_are_limited_per_64_and_mapped_ipv4_with_their_ipv4_address() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            rate_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(rate_key(ip("2001:db8:1:3::1")), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
        assert_eq!(rate_key(ip("192.0.2.1")), ip("192.0.2.1"));

        let text =
            "[[source]]\nid = \"w\"\nkind = \"form\"\n[source.limits]\nper_ip = \"2/minute\"\n";
        let sources = crate::config::Sources::parse("t.toml", text, |_| None).unwrap();
        let limiters = Limiters::new(&sources);
        assert!(limiters.check("w", ip("2001:db8:1:2::1")).is_ok());
        assert!(limiters.check("w", ip("2001:db8:1:2::2")).is_ok());
        assert!(
            limiters
                .check("w", ip("2001:db8:1:2:dead:beef::3"))
                .is_err(),
            "a third address in the same /64 shares its budget"
        );
        assert!(limiters.check("w", ip("2001:db8:1:3::1")).is_ok());
        assert!(limiters.check("w", ip("192.0.2.1")).is_ok());
        assert!(limiters.check("w", ip("::ffff:192.0.2.1")).is_ok());
        assert!(limiters.check("w", ip("192.0.2.1")).is_err());
    }
}
