//! Which client a request comes from, for per-IP throttles (login, registration).
//!
//! The socket's peer, unless that peer is one of `TRUSTED_PROXIES` (`api.trusted_proxies`):
//! then `X-Forwarded-For` is read from the right — each proxy appends the address it received
//! the request from — and the first address that is not itself a trusted proxy is the client.
//! Behind a load balancer every request would otherwise come from the balancer's address, and
//! one client's failures would lock everyone out; without the list, a client cannot pick its
//! own address with a forged header.

use std::net::IpAddr;

use config::IpNet;
use poem::Request;

/// The client address of `req`; `None` when the peer is not an IP socket.
pub fn client_ip(req: &Request, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = req.remote_addr().as_socket_addr()?.ip();
    let forwarded = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    Some(resolve(peer, &forwarded, trusted))
}

/// The client, given the socket's `peer` and the `X-Forwarded-For` values joined by commas.
pub fn resolve(peer: IpAddr, forwarded: &str, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for hop in forwarded.rsplit(',') {
        let Some(ip) = parse_hop(hop) else {
            // an unreadable entry: stop at the last address we could trust
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:5`, `[::1]:5`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    hop.parse::<std::net::SocketAddr>().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_peer() {
        let trusted = config::parse_ip_nets("10.0.0.0/8, 192.168.1.7").unwrap();
        // an untrusted peer's header is ignored
        assert_eq!(
            resolve(ip("203.0.113.9"), "1.1.1.1", &trusted),
            ip("203.0.113.9")
        );
        // from a trusted peer: the rightmost address that is not a trusted proxy
        assert_eq!(
            resolve(
                ip("10.1.2.3"),
                "6.6.6.6, 198.51.100.4, 192.168.1.7",
                &trusted
            ),
            ip("198.51.100.4")
        );
        assert_eq!(
            resolve(ip("10.1.2.3"), "[2001:db8::1]:443", &trusted),
            ip("2001:db8::1")
        );
        // no header, or only proxies: the last trusted hop
        assert_eq!(resolve(ip("10.1.2.3"), "", &trusted), ip("10.1.2.3"));
        assert_eq!(
            resolve(ip("10.1.2.3"), "10.9.9.9", &trusted),
            ip("10.9.9.9")
        );
        // garbage stops the walk
        assert_eq!(
            resolve(ip("10.1.2.3"), "1.1.1.1, nonsense", &trusted),
            ip("10.1.2.3")
        );
        // IPv4-mapped IPv6 peers match IPv4 networks
        assert_eq!(
            resolve(ip("::ffff:10.0.0.1"), "8.8.8.8", &trusted),
            ip("8.8.8.8")
        );
        assert!(config::parse_ip_nets("10.0.0.0/33").is_err());
        assert!(config::parse_ip_nets("nope").is_err());
    }
}
