//! The HTTP server (`[api]`) and the proxies it trusts.

use serde::Deserialize;

/// An IP network (`10.0.0.0/8`, `::1/128`; a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<Self> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.trim(), Some(p.trim())),
            None => (s.trim(), None),
        };
        let addr: std::net::IpAddr = addr.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max)?,
            None => max,
        };
        Some(Self { addr, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Parse a comma-separated list of IP networks (`TRUSTED_PROXIES`).
pub fn parse_ip_nets(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| IpNet::parse(s).ok_or_else(|| format!("{s:?} is not an IP address or network")))
        .collect()
}

/// Parse a comma-separated list of browser origins (`CORS_ALLOWED_ORIGINS`): each
/// `scheme://host[:port]` with scheme `http` or `https`, no path, query, fragment or user info.
/// Returned as browsers send them in `Origin` (lowercase, the scheme's default port left out).
pub fn parse_origins(list: &str) -> Result<Vec<String>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_origin)
        .collect()
}

fn parse_origin(s: &str) -> Result<String, String> {
    let bad = |why: &str| format!("{s:?} is not an origin (scheme://host[:port]): {why}");
    let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    let Some(host) = url.host_str() else {
        return Err(bad("no host"));
    };
    // an Origin header is one exact origin: a pattern would never match, so say so at load
    if host.contains('*') {
        return Err(bad("wildcards are not supported: list each origin"));
    }
    // `Url` turns "http://a.example" into "http://a.example/": only that root path is allowed
    let rest = &s[s.find("://").map_or(0, |i| i + 3)..];
    if rest.contains('/') || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("no path, query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("no user info"));
    }
    Ok(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    pub addr: String,
    pub max_body_bytes: usize,
    pub max_upload_bytes: usize,
    /// How long a stopping API lets in-flight requests finish before it closes their
    /// connections (`API_SHUTDOWN_TIMEOUT_SECS`).
    pub shutdown_timeout_secs: u64,
    /// Longest request head (request line and headers) accepted (`MAX_HEADER_BYTES`); longer
    /// ones are answered 431.
    pub max_header_bytes: usize,
    /// A connection that takes longer to send a request head, or stays idle between requests
    /// that long, is closed (`HEADER_READ_TIMEOUT_SECS`).
    pub header_read_timeout_secs: u64,
    pub json_wait_secs: u64,
    /// Messages one user may post per minute (`MESSAGE_RATE_LIMIT`); then 429.
    pub message_rate_limit: u32,
    /// Interval of the SSE keep-alive comments (`SSE_KEEP_ALIVE_SECS`).
    pub sse_keep_alive_secs: u64,
    /// Event streams one user may hold open at once in one API process
    /// (`SSE_MAX_STREAMS_PER_USER`); then 429.
    pub sse_max_streams_per_user: usize,
    /// How long the proxy's model list is cached for model-settings checks.
    pub models_cache_secs: u64,
    /// Peers (IP addresses or networks, comma-separated) whose `X-Forwarded-For` is believed:
    /// a request from one of them is attributed to the client that header names (per-IP
    /// throttles). Empty: the socket's peer is the client.
    #[serde(default)]
    pub trusted_proxies: String,
    /// Browser origins (comma-separated `scheme://host[:port]`) allowed to call the API from
    /// their own pages (CORS, `CORS_ALLOWED_ORIGINS`). Empty: same origin only, no CORS headers.
    #[serde(default)]
    pub cors_allowed_origins: String,
}

impl ApiSettings {
    /// [`ApiSettings::trusted_proxies`], parsed (validated at load).
    pub fn trusted_proxy_nets(&self) -> Vec<IpNet> {
        parse_ip_nets(&self.trusted_proxies).unwrap_or_default()
    }

    /// [`ApiSettings::cors_allowed_origins`], parsed (validated at load).
    pub fn cors_origins(&self) -> Vec<String> {
        parse_origins(&self.cors_allowed_origins).unwrap_or_default()
    }
}
