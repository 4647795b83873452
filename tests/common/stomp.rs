//! A STOMP client over tungstenite that speaks raw frames, for tests that check the exact
//! bytes a real client sees.

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use super::{TestServer, WAIT};

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A STOMP client speaking raw frames; `protocols` is the `Sec-WebSocket-Protocol` offer.
pub struct Stomp {
    pub ws: Ws,
    /// The subprotocol the server chose.
    pub chosen: Option<String>,
    /// Bytes of frames not yet returned.
    pub pending: Vec<u8>,
}

impl Stomp {
    pub async fn open(srv: &TestServer, protocols: Option<&str>) -> Self {
        Self::open_at(srv, "/stomp/websocket", protocols, None).await
    }

    /// Opens `path`, with `Authorization: Bearer <bearer>` on the upgrade when given (seed
    /// 002's customers authenticate so).
    pub async fn open_at(
        srv: &TestServer,
        path: &str,
        protocols: Option<&str>,
        bearer: Option<&str>,
    ) -> Self {
        let mut req = format!("ws://{}{path}", srv.addr)
            .into_client_request()
            .unwrap();
        if let Some(p) = protocols {
            req.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
        }
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
            req.headers_mut().insert("Authorization", value);
        }
        let (ws, response) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_owned());
        Self {
            ws,
            chosen,
            pending: Vec::new(),
        }
    }

    /// Opens and connects with `CONNECT` headers; returns the CONNECTED frame.
    pub async fn connected(srv: &TestServer, headers: &str) -> (Self, String) {
        let mut c = Self::open(srv, None).await;
        c.send(&format!("CONNECT\n{headers}\n\0")).await;
        let f = c.frame().await;
        assert!(f.starts_with("CONNECTED\n"), "{f:?}");
        (c, f)
    }

    /// Connected with a developer token in the passcode: by the default rules, who may
    /// SEND to `/topic/…` (anonymous clients may only subscribe there).
    pub async fn publisher(srv: &TestServer, version: &str) -> Self {
        let token = srv.token("/auth/developer").await;
        let headers = format!("accept-version:{version}\npasscode:{token}\n");
        Self::connected(srv, &headers).await.0
    }

    /// Connected with a user token for `user` (seed 002's customers; conversations are read
    /// by users and employees only).
    pub async fn user(srv: &TestServer, user: &str, version: &str) -> Self {
        let token = srv.token(&format!("/auth/user?id={user}")).await;
        let headers = format!("accept-version:{version}\npasscode:{token}\n");
        Self::connected(srv, &headers).await.0
    }

    pub async fn send(&mut self, raw: &str) {
        self.ws.send(Message::text(raw)).await.expect("send");
    }

    /// The next STOMP frame (without its NUL), skipping heart-beat EOLs.
    pub async fn frame(&mut self) -> String {
        loop {
            while self
                .pending
                .first()
                .is_some_and(|b| *b == b'\n' || *b == b'\r')
            {
                self.pending.remove(0);
            }
            if let Some(nul) = self.pending.iter().position(|b| *b == 0) {
                let frame: Vec<u8> = self.pending.drain(..=nul).collect();
                return String::from_utf8(frame[..frame.len() - 1].to_vec()).unwrap();
            }
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame in time");
            match msg {
                Some(Ok(Message::Text(t))) => self.pending.extend_from_slice(t.as_bytes()),
                Some(Ok(Message::Binary(b))) => self.pending.extend_from_slice(&b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn close_code(&mut self) -> u16 {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match msg {
                Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
                Some(Ok(Message::Close(None))) => return 1005,
                Some(Ok(_)) => continue,
                _ => panic!("connection dropped without a close frame"),
            }
        }
    }

    /// The body of the next frame, which must be a MESSAGE.
    pub async fn message_body(&mut self) -> String {
        let f = self.frame().await;
        assert!(f.starts_with("MESSAGE\n"), "{f:?}");
        f.split_once("\n\n").unwrap().1.to_owned()
    }

    /// Sends `frame` with a `receipt` header added and waits for its RECEIPT, so what
    /// follows happens after it took effect.
    pub async fn send_synced(&mut self, frame: &str, receipt: &str) {
        let (command, rest) = frame.split_once('\n').unwrap();
        self.send(&format!("{command}\nreceipt:{receipt}\n{rest}"))
            .await;
        assert_eq!(
            self.frame().await,
            format!("RECEIPT\nreceipt-id:{receipt}\n\n")
        );
    }

    /// SUBSCRIBE and wait for its RECEIPT, so a publish after it is seen.
    pub async fn subscribe(&mut self, id: &str, destination: &str) {
        self.send(&format!(
            "SUBSCRIBE\nid:{id}\ndestination:{destination}\nreceipt:sub-{id}\n\n\0"
        ))
        .await;
        assert_eq!(
            self.frame().await,
            format!("RECEIPT\nreceipt-id:sub-{id}\n\n")
        );
    }
}

/// A header's value as a client reads it (1.1/1.2 escapes undone).
pub fn header(frame: &str, name: &str) -> Option<String> {
    let raw = frame
        .split("\n\n")
        .next()?
        .lines()
        .skip(1)
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))?;
    Some(
        raw.replace("\\c", ":")
            .replace("\\n", "\n")
            .replace("\\\\", "\\"),
    )
}
