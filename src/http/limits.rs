//! Abuse limits per source (governor, in process) and the client address they key on.

use std::collections::HashMap;
use std::net::IpAddr;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, RateLimiter};
use ipnet::IpNet;

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

    /// Counts one request from `client` to `source`; refused with the wait until the next
    /// request would be allowed. The per-address limit is checked first so one noisy client
    /// does not use up the source's total.
    pub fn check(&self, source: &str, client: IpAddr) -> Result<(), IngestError> {
        let Some(limiters) = self.by_source.get(source) else {
            return Ok(());
        };
        if let Some(per_ip) = &limiters.per_ip {
            per_ip
                .check_key(&client)
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
/// right-most address of `X-Forwarded-For` that is not itself a trusted proxy.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else {
        return peer;
    };
    let mut client = peer;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            // An unparseable hop ends what we can believe.
            Err(_) => break,
        }
    }
    client
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
}
