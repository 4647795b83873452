//! What a stranger on the open internet can try, and the defined answer to each: bad close
//! codes, connections that never authenticate, bodies that never end, frames meant to
//! forge other clients' frames. Every test also checks that everyone else is still served.

mod common;

use common::stomp::Stomp;
use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
use tokio_tungstenite::tungstenite::Message;

/// A close frame with any code, valid or not (tungstenite would refuse to build some).
fn raw_close(code: u16) -> Message {
    let header = FrameHeader {
        opcode: OpCode::Control(Control::Close),
        ..FrameHeader::default()
    };
    Message::Frame(Frame::from_payload(
        header,
        code.to_be_bytes().to_vec().into(),
    ))
}

/// RFC 6455 §7.4: a close code a peer may not send is answered with 1002 (Autobahn 7.9.x),
/// a valid one with 1000 (7.7.x), on every WebSocket endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_close_codes_are_answered_1002_on_every_endpoint() {
    let srv = TestServer::start().await;
    let cases = [
        (1000u16, 1000u16),
        (4999, 1000),
        (0, 1002),
        (999, 1002),
        (1005, 1002),
    ];
    let cases = cases.into_iter().chain(
        [1004u16, 1006, 1016, 1100, 2000, 2999]
            .into_iter()
            .map(|c| (c, 1002)),
    );
    for (sent, want) in cases {
        let mut c = Client::connect(srv.addr).await;
        c.send_msg(raw_close(sent)).await;
        assert_eq!(c.close_code().await, want, "/connect, close {sent}");

        let mut s = Stomp::open(&srv, None).await;
        s.ws.send(raw_close(sent)).await.unwrap();
        assert_eq!(s.close_code().await, want, "/stomp/websocket, close {sent}");

        let mut e = common::endpoint::Endpoint::open(&srv, "/stream").await;
        e.ws.send(raw_close(sent)).await.unwrap();
        match e.closed().await {
            Closed::Code(code, _) => assert_eq!(code, want, "/stream, close {sent}"),
            Closed::Abrupt => panic!("/stream, close {sent}: no close frame"),
        }
    }
    srv.producer("still-served").await.ping().await;
}
