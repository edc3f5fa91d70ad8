//! Address management for overlay networks: which subnets are acceptable, and handing out
//! addresses (one per endpoint per network, one virtual IP per service per network) so that no
//! address is ever held twice.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The longest prefix a network may have: a /29 leaves five usable addresses.
pub const MAX_PREFIX_LEN: u8 = 29;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamError {
    #[error("`{0}` is not a subnet in CIDR form (for example 10.10.0.0/24)")]
    NotCidr(String),
    #[error("`{0}` is an IPv6 subnet; overlay networks are IPv4 for now")]
    Ipv6(String),
    #[error("subnet {given} has host bits set; did you mean {network}?")]
    HostBits { given: String, network: Ipv4Net },
    #[error("subnet {0} is too small: the longest prefix allowed is /{MAX_PREFIX_LEN}")]
    TooSmall(Ipv4Net),
    #[error("network `{network}` ({subnet}) has no free address left")]
    Exhausted { network: String, subnet: Ipv4Net },
}

/// Parses and checks a subnet given by a user.
pub fn parse_subnet(text: &str) -> Result<Ipv4Net, IpamError> {
    let text = text.trim();
    let net: ipnet::IpNet = text.parse().map_err(|_| IpamError::NotCidr(text.to_owned()))?;
    let ipnet::IpNet::V4(net) = net else { return Err(IpamError::Ipv6(text.to_owned())) };
    if net.addr() != net.network() {
        return Err(IpamError::HostBits { given: text.to_owned(), network: net.trunc() });
    }
    if net.prefix_len() > MAX_PREFIX_LEN {
        return Err(IpamError::TooSmall(net));
    }
    Ok(net)
}

/// Whether two subnets share any address.
pub fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// The addresses of `subnet` that may be handed out: all hosts but the first, which stays
/// reserved (a gateway, should one ever be needed).
pub fn assignable(subnet: &Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    subnet.hosts().skip(1)
}

/// The lowest assignable address of `subnet` not in `used`.
pub fn allocate(network: &str, subnet: &Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
    assignable(subnet)
        .find(|a| !used.contains(a))
        .ok_or_else(|| IpamError::Exhausted { network: network.to_owned(), subnet: *subnet })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subnets_are_checked() {
        assert_eq!(parse_subnet("10.1.0.0/24").unwrap().to_string(), "10.1.0.0/24");
        for (input, want) in [
            ("10.1.0.0", IpamError::NotCidr("10.1.0.0".into())),
            ("banana/8", IpamError::NotCidr("banana/8".into())),
            ("fd00::/64", IpamError::Ipv6("fd00::/64".into())),
            ("10.1.0.0/30", IpamError::TooSmall("10.1.0.0/30".parse().unwrap())),
            (
                "10.1.0.5/24",
                IpamError::HostBits { given: "10.1.0.5/24".into(), network: "10.1.0.0/24".parse().unwrap() },
            ),
        ] {
            assert_eq!(parse_subnet(input).unwrap_err(), want, "{input}");
        }
    }

    #[test]
    fn overlap_is_symmetric_and_exact() {
        let net = |s: &str| s.parse::<Ipv4Net>().unwrap();
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.5.0/24")));
        assert!(overlaps(&net("10.0.5.0/24"), &net("10.0.0.0/16")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
    }

    #[test]
    fn a_29_has_five_addresses_then_exhaustion() {
        let subnet = parse_subnet("10.9.0.0/29").unwrap();
        let mut used = BTreeSet::new();
        for _ in 0..5 {
            used.insert(allocate("n", &subnet, &used).unwrap());
        }
        assert!(!used.contains(&"10.9.0.1".parse().unwrap()), "the first host stays reserved");
        assert!(matches!(allocate("n", &subnet, &used), Err(IpamError::Exhausted { .. })));
    }

    proptest! {
        /// Any sequence of allocations and frees never hands out an address that is held, and
        /// every address handed out is inside the subnet.
        #[test]
        fn never_hands_out_an_address_twice(ops in proptest::collection::vec(any::<(bool, u8)>(), 1..200)) {
            let subnet = parse_subnet("10.20.0.0/26").unwrap();
            let mut held: BTreeSet<Ipv4Addr> = BTreeSet::new();
            for (alloc, pick) in ops {
                if alloc || held.is_empty() {
                    match allocate("n", &subnet, &held) {
                        Ok(a) => {
                            prop_assert!(subnet.contains(&a));
                            prop_assert!(held.insert(a), "{} handed out twice", a);
                        }
                        Err(IpamError::Exhausted { .. }) => prop_assert_eq!(held.len(), 61),
                        Err(e) => prop_assert!(false, "{}", e),
                    }
                } else {
                    let victim = *held.iter().nth(pick as usize % held.len()).unwrap();
                    held.remove(&victim);
                }
            }
        }
    }
}
