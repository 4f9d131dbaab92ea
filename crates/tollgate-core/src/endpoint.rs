//! Endpoints: a public slug mapped to 1..=8 upstream targets, tried in order.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub const MAX_TARGETS: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Provider {
    OpenaiCompatible,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Region {
    #[default]
    Unrestricted,
    Eu,
}

/// One upstream: `POST {base_url}/chat/completions` with `model = target_model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub provider: Provider,
    pub base_url: String,
    pub target_model: String,
    #[serde(default)]
    pub secret_id: Option<String>,
}

/// True for addresses an upstream or webhook may only use when the operator allows
/// private networks: loopback, link-local, private, unique-local, unspecified, CGNAT,
/// and IPv4 mapped into IPv6 with any of those.
pub fn is_private_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || (a == 100 && (64..128).contains(&b))
                || a == 0
        }
        IpAddr::V6(v6) => {
            if let Some(mapped) = v6.to_ipv4_mapped() {
                return is_private_address(IpAddr::V4(mapped));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// What a URL is for: an upstream base URL is joined with `/chat/completions` and so on,
/// so it takes no query; a webhook receiver's query is its own business (some receivers
/// authenticate with one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UrlUse {
    Upstream,
    Webhook,
}

/// Checks the shape of an upstream or webhook URL: http or https, a host, no
/// credentials, no fragment (never sent, so holding one is a mistake), and for an upstream
/// no query. Returns the reason when it is not acceptable.
pub fn validate_http_url(text: &str, usage: UrlUse) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("not a valid URL ({e})"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err("must use http or https".into());
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials".into());
    }
    match usage {
        UrlUse::Upstream if url.query().is_some() || url.fragment().is_some() => {
            Err("must not have a query or fragment".into())
        }
        UrlUse::Webhook if url.fragment().is_some() => Err("must not have a fragment".into()),
        _ => Ok(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_ranges() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_private_address(private.parse().unwrap()), "{private}");
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_private_address(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn url_shapes() {
        let upstream = |u| validate_http_url(u, UrlUse::Upstream);
        let webhook = |u| validate_http_url(u, UrlUse::Webhook);
        assert!(upstream("https://api.example.com/v1").is_ok());
        assert_eq!(
            upstream("ftp://x/v1").unwrap_err(),
            "must use http or https"
        );
        assert!(upstream("https://u:p@x/v1").is_err());
        assert!(upstream("not a url").is_err());
        assert_eq!(
            upstream("https://x/v1?a=b").unwrap_err(),
            "must not have a query or fragment"
        );
        assert!(webhook("https://x/hook?code=abc").is_ok());
        assert_eq!(
            webhook("https://x/hook#part").unwrap_err(),
            "must not have a fragment"
        );
    }
}
