//! The server under test: parses `--url`, resolves it once, and enforces the
//! loopback-only rule unless `--allow-remote` is given.

use std::net::{SocketAddr, ToSocketAddrs};

use anyhow::{bail, Context, Result};

/// Where every WebSocket and HTTP request of the run goes.
#[derive(Clone, Debug)]
pub struct Target {
    /// Resolved address every TCP connection is made to.
    pub addr: SocketAddr,
    /// Value of the HTTP `Host` header (`host:port`).
    pub host_header: String,
    /// Path prefix before `/connect`, `/auth/…` and `/metrics` (usually empty).
    pub prefix: String,
}

impl Target {
    /// Parses `ws://host[:port][/prefix]` (or `http://`). A trailing
    /// `/connect` is dropped so the WebSocket URL itself is accepted too.
    pub fn parse(url: &str, allow_remote: bool) -> Result<Self> {
        let (host, port, prefix) = split_url(url)?;
        let addrs: Vec<SocketAddr> = (host.as_str(), port)
            .to_socket_addrs()
            .with_context(|| format!("resolving {host}:{port}"))?
            .collect();
        if addrs.is_empty() {
            bail!("{host}:{port} resolved to no address");
        }
        if !allow_remote {
            if let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
                bail!(
                    "{url} resolves to {remote}, which is not a loopback address; \
                     pass --allow-remote to load a remote server"
                );
            }
        }
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .copied()
            .unwrap_or(addrs[0]);
        let host_header = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            addr,
            host_header,
            prefix,
        })
    }

    /// Request path for an endpoint such as `/connect`.
    pub fn path(&self, endpoint: &str) -> String {
        format!("{}{endpoint}", self.prefix)
    }
}

/// Splits a URL into (host without brackets, port, path prefix).
fn split_url(url: &str) -> Result<(String, u16, String)> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("URL {url:?} has no scheme (expected ws://host:port)"))?;
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => 80,
        "wss" | "https" => {
            bail!("{scheme}:// is not supported: sensorgate-load speaks plain ws://")
        }
        other => bail!("unsupported URL scheme {other:?} (expected ws://)"),
    };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.contains('@') {
        bail!("URL {url:?}: user info is not supported");
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("URL {url:?}: unterminated IPv6 literal"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .with_context(|| format!("URL {url:?}: bad port"))?,
            ),
        };
        (host, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        bail!("URL {url:?} has no host");
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("URL {url:?}: bad port {p:?}"))?,
        None => default_port,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.trim_end_matches('/');
    let prefix = path.strip_suffix("/connect").unwrap_or(path).to_string();
    Ok((host.to_string(), port, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_urls() {
        let s = |u: &str| split_url(u).unwrap();
        assert_eq!(
            s("ws://127.0.0.1:8080"),
            ("127.0.0.1".into(), 8080, "".into())
        );
        assert_eq!(
            s("ws://127.0.0.1:8080/"),
            ("127.0.0.1".into(), 8080, "".into())
        );
        assert_eq!(
            s("ws://localhost:1/connect"),
            ("localhost".into(), 1, "".into())
        );
        assert_eq!(
            s("http://[::1]:9/gw/connect?x=1"),
            ("::1".into(), 9, "/gw".into())
        );
        assert_eq!(s("ws://localhost"), ("localhost".into(), 80, "".into()));
        assert!(split_url("wss://127.0.0.1").is_err());
        assert!(split_url("127.0.0.1:8080").is_err());
        assert!(split_url("ws://127.0.0.1:99999").is_err());
        assert!(split_url("ws://:80").is_err());
    }

    #[test]
    fn loopback_only_by_default() {
        let t = Target::parse("ws://127.0.0.1:8080", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.host_header, "127.0.0.1:8080");
        assert_eq!(t.path("/connect"), "/connect");
        let t = Target::parse("ws://[::1]:81/p", false).unwrap();
        assert_eq!(t.host_header, "[::1]:81");
        assert_eq!(t.path("/metrics"), "/p/metrics");
        assert!(Target::parse("ws://10.1.2.3:8080", false).is_err());
        assert!(Target::parse("ws://10.1.2.3:8080", true).is_ok());
    }
}
