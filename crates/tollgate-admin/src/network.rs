//! Refusing upstream URLs that point into the gateway's own network (SPEC §1.5).
//!
//! Unless the operator allows private networks, the host is resolved now and every
//! address it resolves to must be public: one private answer is enough to refuse, since
//! the data plane may connect to any of them. This is a write-time check; the data plane
//! does not re-resolve for it.

use std::net::IpAddr;
use std::time::Duration;

use tollgate_core::endpoint::{is_private_address, validate_http_url, UrlUse};
use url::Host;

/// How long a write waits for DNS before refusing the URL.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a URL was refused: `code` is the API error code, `reason` completes the message
/// after the field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlRefusal {
    pub code: &'static str,
    pub reason: String,
}

fn refuse(code: &'static str, reason: impl Into<String>) -> UrlRefusal {
    UrlRefusal {
        code,
        reason: reason.into(),
    }
}

/// Checks an upstream or webhook URL: its shape always, and — unless
/// `allow_private_networks` — that its host resolves only to public addresses.
pub async fn check_public_url(
    text: &str,
    usage: UrlUse,
    allow_private_networks: bool,
) -> Result<(), UrlRefusal> {
    let url = validate_http_url(text, usage).map_err(|why| refuse("invalid_payload", why))?;
    if allow_private_networks {
        return Ok(());
    }
    let addresses: Vec<IpAddr> = match url.host() {
        Some(Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
        Some(Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
        Some(Host::Domain(domain)) => {
            let port = url.port_or_known_default().unwrap_or(443);
            let unresolved = || {
                refuse(
                    "unresolvable_host",
                    format!("host '{domain}' could not be resolved"),
                )
            };
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((domain, port)))
                .await
            {
                Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                Ok(Err(_)) | Err(_) => return Err(unresolved()),
            }
        }
        None => return Err(refuse("invalid_payload", "must name a host")),
    };
    if addresses.is_empty() {
        return Err(refuse(
            "unresolvable_host",
            "host could not be resolved to any address",
        ));
    }
    if let Some(private) = addresses.into_iter().find(|ip| is_private_address(*ip)) {
        return Err(refuse(
            "private_network_url",
            format!(
                "resolves to a loopback, private or link-local address ({private}); \
                 set TOLLGATE_ALLOW_PRIVATE_NETWORKS=true to allow it"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn private_literals_are_refused_unless_allowed() {
        let refusal = check_public_url("http://127.0.0.1:9000/v1", UrlUse::Upstream, false)
            .await
            .unwrap_err();
        assert_eq!(refusal.code, "private_network_url");
        assert!(refusal.reason.contains("(127.0.0.1)"), "{}", refusal.reason);
        let refusal = check_public_url("http://[::1]/v1", UrlUse::Upstream, false)
            .await
            .unwrap_err();
        assert_eq!(refusal.code, "private_network_url");
        let refusal = check_public_url("http://169.254.169.254/v1", UrlUse::Upstream, false)
            .await
            .unwrap_err();
        assert_eq!(refusal.code, "private_network_url");
        assert_eq!(
            check_public_url("http://127.0.0.1:9000/v1", UrlUse::Upstream, true).await,
            Ok(())
        );
        assert_eq!(
            check_public_url("https://8.8.8.8/v1", UrlUse::Upstream, false).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_and_unknown_names_are_refused() {
        let refusal = check_public_url("http://localhost:9000/v1", UrlUse::Upstream, false)
            .await
            .unwrap_err();
        assert_eq!(refusal.code, "private_network_url");
        let refusal = check_public_url("https://no-such-host.invalid/v1", UrlUse::Upstream, false)
            .await
            .unwrap_err();
        assert_eq!(refusal.code, "unresolvable_host");
        assert_eq!(
            refusal.reason,
            "host 'no-such-host.invalid' could not be resolved"
        );
    }

    #[tokio::test]
    async fn shapes_are_checked_even_when_private_networks_are_allowed() {
        let refusal = check_public_url("ftp://127.0.0.1/v1", UrlUse::Upstream, true)
            .await
            .unwrap_err();
        assert_eq!(
            refusal,
            UrlRefusal {
                code: "invalid_payload",
                reason: "must use http or https".into()
            }
        );
    }
}
