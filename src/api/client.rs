//! Extracting the end user's context and the bearer token from a request.
//!
//! The `ClientContext` message wins; without it we fall back to metadata: `user-agent`,
//! `x-device-fingerprint`, and `x-forwarded-for`, believed only from trusted proxies (the
//! right-most address not itself a trusted proxy), else the peer address.

use std::net::IpAddr;

use ipnet::IpNet;
use tonic::{Request, metadata::MetadataMap};

use super::pb;
use crate::auth::{AuthError, ClientInfo};

pub fn client_info<T>(
    request: &Request<T>,
    context: Option<&pb::ClientContext>,
    trusted: &[IpNet],
) -> Result<ClientInfo, AuthError> {
    let metadata = request.metadata();
    let context = context.cloned().unwrap_or_default();
    let ip = if context.ip_address.trim().is_empty() {
        request.remote_addr().map(|peer| client_ip(peer.ip(), metadata, trusted))
    } else {
        Some(context.ip_address.trim().parse::<IpAddr>().map_err(|_| {
            AuthError::invalid("client.ip_address", "client.ip_address must be an IPv4 or IPv6 address")
        })?)
    };
    let or_metadata = |value: String, key: &str| {
        if value.is_empty() {
            metadata.get(key).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
        } else {
            value
        }
    };
    Ok(ClientInfo {
        ip,
        user_agent: or_metadata(context.user_agent, "user-agent"),
        fingerprint: or_metadata(context.device_fingerprint, "x-device-fingerprint"),
    })
}

fn client_ip(peer: IpAddr, metadata: &MetadataMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded = metadata
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    // Walk from the nearest hop outwards; the first address we do not trust is the client.
    let mut client = peer;
    for hop in forwarded.rsplit(',').map(str::trim).filter(|h| !h.is_empty()) {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

/// The token of `authorization: Bearer <token>`, if the call carries one.
pub fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut map = MetadataMap::new();
        for (k, v) in pairs {
            map.append(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let md = metadata(&[("x-forwarded-for", "198.51.100.7, 10.1.1.1")]);
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(client_ip(proxy, &md, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        let stranger: IpAddr = "203.0.113.5".parse().unwrap();
        assert_eq!(client_ip(stranger, &md, &trusted), stranger);
        // A spoofed left-most entry does not win over the first untrusted hop.
        let md = metadata(&[("x-forwarded-for", "1.2.3.4, 198.51.100.7")]);
        assert_eq!(client_ip(proxy, &md, &trusted), "198.51.100.7".parse::<IpAddr>().unwrap());
        let md = metadata(&[("x-forwarded-for", "garbage")]);
        assert_eq!(client_ip(proxy, &md, &trusted), proxy);
    }

    #[test]
    fn bearer_tokens_are_extracted() {
        assert_eq!(bearer(&metadata(&[("authorization", "Bearer abc.def")])), Some("abc.def"));
        assert_eq!(bearer(&metadata(&[("authorization", "bearer   abc")])), Some("abc"));
        assert_eq!(bearer(&metadata(&[("authorization", "Basic abc")])), None);
        assert_eq!(bearer(&metadata(&[("authorization", "Bearer ")])), None);
        assert_eq!(bearer(&metadata(&[])), None);
    }
}
