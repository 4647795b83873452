//! Plain-HTTP calls to the gateway over a reused keep-alive connection:
//! minting single-use tokens (`/auth/developer`, `/auth/user`), publishing to
//! topics (`/api/publish`) and scraping the server's resident memory from
//! `/metrics`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::timeout;

use crate::creds::Developer;
use crate::target::Target;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// One keep-alive HTTP/1.1 connection, reopened when the server drops it.
/// Not shareable: give each concurrent worker its own.
pub struct HttpClient {
    target: Target,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            sender: None,
        }
    }

    /// Mints a consumer token for a developer.
    pub async fn developer_token(&mut self, dev: &Developer) -> Result<String> {
        let path = self.target.path("/auth/developer");
        self.token(&path, &path, dev).await
    }

    /// Mints a producer token for user `uid` of a developer.
    pub async fn user_token(&mut self, dev: &Developer, uid: &str) -> Result<String> {
        let endpoint = self.target.path("/auth/user");
        let path = format!("{endpoint}?id={}", url_encode(uid));
        self.token(&endpoint, &path, dev).await
    }

    /// POSTs a JSON body to `/api/publish` with a developer's key.
    pub async fn publish(&mut self, dev: &Developer, body: Bytes) -> Result<()> {
        let path = self.target.path("/api/publish");
        let headers = [
            ("dev-id", dev.id.as_str()),
            ("x-api-key", dev.api_key.as_str()),
            ("content-type", "application/json"),
        ];
        let (status, answer) = self.request(Method::POST, &path, &headers, body).await?;
        if status != StatusCode::OK {
            bail!(
                "POST /api/publish: HTTP {status}: {}",
                String::from_utf8_lossy(&answer).trim()
            );
        }
        Ok(())
    }

    /// POSTs to `path`; errors name only `endpoint` (no per-user query) so
    /// failures group well in reports.
    async fn token(&mut self, endpoint: &str, path: &str, dev: &Developer) -> Result<String> {
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: String,
        }
        let headers = [
            ("dev-id", dev.id.as_str()),
            ("x-api-key", dev.api_key.as_str()),
        ];
        let (status, body) = self
            .request(Method::POST, path, &headers, Bytes::new())
            .await
            .map_err(|e| anyhow!("POST {endpoint}: {}", e.root_cause()))?;
        if status != StatusCode::OK {
            bail!(
                "POST {endpoint} for developer {:?}: HTTP {status}: {}",
                dev.id,
                String::from_utf8_lossy(&body).trim()
            );
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .with_context(|| format!("POST {endpoint}: response is not {{\"token\":…}}"))?;
        Ok(parsed.token)
    }

    /// The server's `sensorgate_process_resident_memory_bytes`, if exported.
    pub async fn resident_memory(&mut self) -> Result<Option<u64>> {
        let path = self.target.path("/metrics");
        let (status, body) = self.request(Method::GET, &path, &[], Bytes::new()).await?;
        if status != StatusCode::OK {
            bail!("GET {path}: HTTP {status}");
        }
        Ok(metric_value(
            &String::from_utf8_lossy(&body),
            "sensorgate_process_resident_memory_bytes",
        )
        .map(|v| v as u64))
    }

    /// One request; retried once on a fresh connection if the kept-alive one
    /// turned out to be dead.
    async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        let reused = self.sender.as_ref().is_some_and(|s| !s.is_closed());
        match self
            .request_once(method.clone(), path, headers, body.clone())
            .await
        {
            Err(e) if reused => {
                self.sender = None;
                self.request_once(method, path, headers, body)
                    .await
                    .with_context(|| format!("retry after: {e:#}"))
            }
            other => other,
        }
    }

    async fn request_once(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        let what = format!("{method} {path}");
        let result = timeout(REQUEST_TIMEOUT, async {
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, self.target.host_header.as_str());
            if method == Method::POST {
                req = req.header(hyper::header::CONTENT_LENGTH, body.len());
            }
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req.body(Full::new(body))?;
            let response = self.sender().await?.send_request(req).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        })
        .await;
        match result {
            Ok(Ok(ok)) => Ok(ok),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e.context(what))
            }
            Err(_) => {
                self.sender = None;
                Err(anyhow!("{what}: timed out"))
            }
        }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Full<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let stream = TcpStream::connect(self.target.addr)
                .await
                .with_context(|| format!("connecting to {}", self.target.addr))?;
            stream.set_nodelay(true)?;
            let (sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                // The connection ends when the server or we drop it; its
                // errors surface through the next request.
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        let sender = self
            .sender
            .as_mut()
            .ok_or_else(|| anyhow!("no HTTP connection"))?;
        sender.ready().await?;
        Ok(sender)
    }
}

/// Value of an unlabelled (or first labelled) sample in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.as_bytes().first()? {
                b' ' | b'\t' => rest,
                b'{' => &rest[rest.find('}')? + 1..],
                _ => return None,
            };
            rest.split_whitespace().next()?.parse().ok()
        })
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
pub fn url_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parsing() {
        let text = "# HELP sensorgate_process_resident_memory_bytes RSS\n\
                    # TYPE sensorgate_process_resident_memory_bytes gauge\n\
                    sensorgate_process_resident_memory_bytes_total 1\n\
                    sensorgate_process_resident_memory_bytes 12345678\n";
        assert_eq!(
            metric_value(text, "sensorgate_process_resident_memory_bytes"),
            Some(12_345_678.0)
        );
        assert_eq!(metric_value("m{a=\"b\"} 1.5e3\n", "m"), Some(1500.0));
        assert_eq!(metric_value("other 1\n", "m"), None);
    }

    #[test]
    fn encodes_uids() {
        assert_eq!(url_encode("load-demo-1"), "load-demo-1");
        assert_eq!(url_encode("a b&c=é"), "a%20b%26c%3D%C3%A9");
    }
}
