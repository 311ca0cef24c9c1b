//! Fetching an image over http(s) without becoming a way into the local
//! network: every hop's host is resolved here, each address checked, and the
//! connection pinned to the checked addresses (so a second DNS answer cannot
//! swap in another). Redirects are followed by hand for the same reason.

use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Instant;

use reqwest::blocking::{Client, Response};
use reqwest::{redirect, Url};

use crate::{ImageLimits, VisionError};

/// Download `url` within `limits`.
pub(crate) fn fetch(url: &str, limits: &ImageLimits) -> Result<Vec<u8>, VisionError> {
    let allow = |ip: IpAddr| limits.allow_private_urls || is_public_address(ip);
    fetch_with_policy(url, limits, &allow)
}

/// [`fetch`] with the address policy passed in, so tests can allow loopback
/// alone and check that a redirect to a private address is refused.
pub(crate) fn fetch_with_policy(
    url: &str,
    limits: &ImageLimits,
    allow: &dyn Fn(IpAddr) -> bool,
) -> Result<Vec<u8>, VisionError> {
    let deadline = Instant::now() + limits.total_timeout;
    let mut current = parse_http_url(url)?;
    for _ in 0..=limits.max_redirects {
        let addrs = resolve_allowed(&current, allow)?;
        let response = send(&current, &addrs, deadline, limits)?;
        let status = response.status();
        if status.is_redirection() {
            current = redirect_target(&current, &response)?;
            continue;
        }
        if !status.is_success() {
            return Err(VisionError::HttpStatus {
                url: current.to_string(),
                status: status.as_u16(),
            });
        }
        return read_body(response, &current, deadline, limits.max_bytes);
    }
    Err(VisionError::TooManyRedirects {
        url: url.to_string(),
        limit: limits.max_redirects,
    })
}

fn parse_http_url(text: &str) -> Result<Url, VisionError> {
    let url = Url::parse(text).map_err(|e| VisionError::BadUrl {
        url: text.to_string(),
        reason: e.to_string(),
    })?;
    check_scheme(url)
}

fn check_scheme(url: Url) -> Result<Url, VisionError> {
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(VisionError::BadScheme {
            scheme: other.to_string(),
            url: url.to_string(),
        }),
    }
}

fn redirect_target(from: &Url, response: &Response) -> Result<Url, VisionError> {
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| VisionError::Fetch {
            url: from.to_string(),
            reason: format!(
                "HTTP {} redirect without a usable Location header",
                response.status().as_u16()
            ),
        })?;
    let next = from.join(location).map_err(|e| VisionError::BadUrl {
        url: location.to_string(),
        reason: e.to_string(),
    })?;
    check_scheme(next)
}

/// Resolve the URL's host and refuse it if any address is not allowed: a
/// host with one public and one private address could be steered to either.
fn resolve_allowed(
    url: &Url,
    allow: &dyn Fn(IpAddr) -> bool,
) -> Result<Vec<SocketAddr>, VisionError> {
    let Some(host) = url.host_str().map(str::to_string) else {
        return Err(VisionError::BadUrl {
            url: url.to_string(),
            reason: "no host".into(),
        });
    };
    let port = url.port_or_known_default().unwrap_or(80);
    let addrs: Vec<SocketAddr> = match literal_ip(url) {
        // An address literal needs no lookup (and must not get one).
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => (host.as_str(), port)
            .to_socket_addrs()
            .map_err(|e| VisionError::Fetch {
                url: url.to_string(),
                reason: format!("cannot resolve {host}: {e}"),
            })?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(VisionError::Fetch {
            url: url.to_string(),
            reason: format!("{host} has no addresses"),
        });
    }
    if let Some(bad) = addrs.iter().find(|a| !allow(a.ip())) {
        return Err(VisionError::PrivateAddress {
            url: url.to_string(),
            host,
            addr: bad.ip(),
        });
    }
    Ok(addrs)
}

/// The host as an IP address, if it is one (`host_str` brackets IPv6).
fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn send(
    url: &Url,
    addrs: &[SocketAddr],
    deadline: Instant,
    limits: &ImageLimits,
) -> Result<Response, VisionError> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(VisionError::Timeout {
            url: url.to_string(),
        });
    }
    let mut builder = Client::builder()
        .redirect(redirect::Policy::none())
        // A proxy would do its own DNS and reach whatever it can reach.
        .no_proxy()
        .connect_timeout(limits.connect_timeout.min(remaining))
        .timeout(remaining)
        .user_agent(concat!("seer/", env!("CARGO_PKG_VERSION")));
    if let (None, Some(domain)) = (literal_ip(url), url.host_str()) {
        builder = builder.resolve_to_addrs(domain, addrs);
    }
    let client = builder.build().map_err(|e| fetch_error(url, &e))?;
    client
        .get(url.clone())
        .send()
        .map_err(|e| fetch_error(url, &e))
}

fn fetch_error(url: &Url, err: &reqwest::Error) -> VisionError {
    if err.is_timeout() {
        return VisionError::Timeout {
            url: url.to_string(),
        };
    }
    // reqwest's Display stops at the outermost layer; the cause says what happened.
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        reason = format!("{reason}: {cause}");
        source = cause.source();
    }
    VisionError::Fetch {
        url: url.to_string(),
        reason,
    }
}

/// Read the body, stopping as soon as it passes `max_bytes` or the deadline.
fn read_body(
    mut response: Response,
    url: &Url,
    deadline: Instant,
    max_bytes: usize,
) -> Result<Vec<u8>, VisionError> {
    if let Some(len) = response.content_length() {
        if len > max_bytes as u64 {
            return Err(VisionError::TooManyBytes {
                size: len,
                limit: max_bytes,
            });
        }
    }
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if Instant::now() > deadline {
            return Err(VisionError::Timeout {
                url: url.to_string(),
            });
        }
        let n = match response.read(&mut chunk) {
            Ok(0) => return Ok(body),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::TimedOut => {
                return Err(VisionError::Timeout {
                    url: url.to_string(),
                })
            }
            Err(e) => {
                return Err(VisionError::Fetch {
                    url: url.to_string(),
                    reason: format!("reading the body: {e}"),
                })
            }
        };
        if body.len() + n > max_bytes {
            return Err(VisionError::TooManyBytes {
                size: (body.len() + n) as u64,
                limit: max_bytes,
            });
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// Whether `ip` is an ordinary public unicast address. Loopback, private,
/// shared (CGNAT), link-local (cloud metadata lives at 169.254.169.254),
/// unspecified, multicast, broadcast and reserved ranges are not; IPv6
/// addresses that embed an IPv4 one are judged by it.
pub fn is_public_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    let this_network = a == 0;
    let shared = a == 100 && (64..128).contains(&b);
    let reserved = a >= 240;
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || this_network
        || shared
        || reserved)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    let unique_local = first & 0xfe00 == 0xfc00;
    let link_local = first & 0xffc0 == 0xfe80;
    let site_local = first & 0xffc0 == 0xfec0;
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || unique_local
        || link_local
        || site_local)
}

/// The IPv4 address inside an IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible
/// (::a.b.c.d), NAT64 (64:ff9b::/96) or 6to4 (2002::/16) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let from =
        |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if ip.is_loopback() || ip.is_unspecified() {
        return None;
    }
    if s[..5] == [0; 5] && (s[5] == 0 || s[5] == 0xffff) {
        return Some(from(s[6], s[7]));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(from(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(from(s[1], s[2]));
    }
    None
}

#[cfg(test)]
#[path = "../tests/support/http_server.rs"]
mod http_server;

#[cfg(test)]
mod tests {
    use super::http_server::{serve, Reply};
    use super::*;

    #[test]
    fn redirect_to_a_private_address_is_refused() {
        // Loopback is allowed here only so the first hop can reach the test server.
        let addr = serve(vec![(
            "/hop",
            Reply::Redirect("http://10.0.0.1/x.png".into()),
        )]);
        let loopback_only = |ip: IpAddr| ip.is_loopback();
        let url = format!("http://{addr}/hop");
        let err = fetch_with_policy(&url, &ImageLimits::default(), &loopback_only).unwrap_err();
        assert!(
            matches!(&err, VisionError::PrivateAddress { host, .. } if host == "10.0.0.1"),
            "{err}"
        );
    }

    fn public(s: &str) -> bool {
        is_public_address(s.parse().unwrap())
    }

    #[test]
    fn classifies_addresses() {
        for ok in [
            "93.184.215.14",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(public(ok), "{ok} should be public");
        }
        let refused = [
            "127.0.0.1",
            "127.8.9.10",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::127.0.0.1",
            "64:ff9b::a00:1",
            "2002:a9fe:a9fe::1",
        ];
        for bad in refused {
            assert!(!public(bad), "{bad} should be refused");
        }
    }
}
