//! A `/stream` client as BIMserver's JavaScript API drives it: welcome, token, endpoint id,
//! then JSON API calls over the socket or `POST /json`, and pushes.

use futures_util::SinkExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::{http_with_body, Closed, TestServer, Ws};

pub struct Endpoint {
    pub ws: Ws,
    /// The welcome's timestamp.
    pub welcome: u64,
    /// Set by [`Endpoint::identify`].
    pub id: u64,
}

impl Endpoint {
    /// Opens `path` and reads the welcome.
    pub async fn open(srv: &TestServer, path: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", srv.addr))
            .await
            .expect("upgrade");
        let mut e = Self {
            ws,
            welcome: 0,
            id: 0,
        };
        let welcome = e.recv_json().await;
        e.welcome = welcome["welcome"].as_u64().expect("welcome first");
        e
    }

    /// Sends the token and expects the endpoint reply in both shapes.
    pub async fn identify(&mut self, token: &str) -> u64 {
        self.send(&serde_json::json!({ "token": token }).to_string())
            .await;
        let reply = self.recv_json().await;
        assert_eq!(reply["type"], "endpoint", "{reply}");
        let id = reply["endpointid"].as_u64().expect("top-level endpointid");
        assert_eq!(reply["payload"]["endpointid"].as_u64(), Some(id), "{reply}");
        self.id = id;
        id
    }

    pub async fn connected(srv: &TestServer, path: &str, token: &str) -> Self {
        let mut e = Self::open(srv, path).await;
        e.identify(token).await;
        e
    }

    pub async fn send(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next text message; pings are answered by the library as it reads.
    pub async fn recv(&mut self) -> String {
        super::recv_text(&mut self.ws).await
    }

    pub async fn recv_json(&mut self) -> Value {
        serde_json::from_str(&self.recv().await).unwrap()
    }

    /// A JSON API call over the socket, without a token (the socket's owner acts).
    pub async fn call(&mut self, id: u64, interface: &str, method: &str, params: Value) -> Value {
        let request = serde_json::json!({
            "id": id,
            "request": {"interface": interface, "method": method, "parameters": params}
        });
        self.send(&request.to_string()).await;
        let reply = self.recv_json().await;
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }

    pub async fn closed(&mut self) -> Closed {
        super::closed(&mut self.ws).await
    }
}

/// `POST /json` with `token` in the envelope: (status, reply).
pub async fn json_call(
    srv: &TestServer,
    token: &str,
    interface: &str,
    method: &str,
    params: Value,
) -> (u16, Value) {
    let (status, text) = json_call_text(srv, token, interface, method, params).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// [`json_call`] with the reply as sent, for byte-for-byte comparisons.
pub async fn json_call_text(
    srv: &TestServer,
    token: &str,
    interface: &str,
    method: &str,
    params: Value,
) -> (u16, String) {
    let body = serde_json::json!({
        "token": token,
        "request": {"interface": interface, "method": method, "parameters": params}
    });
    json_body(srv, "/json", &body.to_string()).await
}

/// `POST` of a raw body to a JSON API path: (status, reply text).
pub async fn json_body(srv: &TestServer, path: &str, body: &str) -> (u16, String) {
    http_with_body(
        srv.addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body,
    )
    .await
}

/// What a reply's single response says: `Ok(result)` or `Err(exception message)`.
pub fn outcome(reply: &Value) -> Result<Value, String> {
    let r = &reply["response"];
    match r.get("result") {
        Some(v) => Ok(v.clone()),
        None => Err(r["exception"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("neither result nor exception: {reply}"))
            .to_string()),
    }
}

/// Publishes through `/api/publish` with the developer's key; panics unless 200.
pub async fn publish(srv: &TestServer, destination: &str, data: Value) {
    let body = serde_json::json!({ "destination": destination, "data": data });
    let (status, text) = http_with_body(
        srv.addr,
        "POST",
        "/api/publish",
        &[("dev-id", super::DEV), ("x-api-key", super::KEY)],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
}

/// A golden file under tests/golden/endpoint, without its trailing newline.
pub fn golden(name: &str) -> String {
    let path = format!(
        "{}/tests/golden/endpoint/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim_end_matches('\n')
        .to_string()
}
