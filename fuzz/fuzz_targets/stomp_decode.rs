//! STOMP decoding must never panic, and whatever it accepts must survive an encode/decode
//! round trip unchanged. The input is fed in two pieces, as frames split across WebSocket
//! messages arrive.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sensorgate::frontend::stomp::codec::{decode, encode, Decoded, Limits, Version};
use sensorgate::frontend::stomp::frame::Inbound;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, data)) = data.split_first() else {
        return;
    };
    let version = Version::ALL[usize::from(selector % 3)];
    let split = usize::from(selector) % (data.len() + 1);
    let limits = Limits {
        max_frame_bytes: 4096,
        max_headers: 16,
        max_header_line: 512,
    };
    let mut buf = BytesMut::from(&data[..split]);
    let mut rest = &data[split..];
    loop {
        match decode(&mut buf, version, &limits) {
            Ok(Some(Decoded::Frame(frame))) => {
                let _ = Inbound::from_raw(frame.clone(), version);
                let mut wire = Vec::new();
                encode(&frame, version, &mut wire);
                let mut again = BytesMut::from(&wire[..]);
                let big = Limits {
                    max_frame_bytes: usize::MAX,
                    max_headers: usize::MAX,
                    max_header_line: usize::MAX,
                };
                match decode(&mut again, version, &big) {
                    Ok(Some(Decoded::Frame(mut back))) => {
                        back.headers.retain(|(n, _)| n != "content-length");
                        let mut want = frame;
                        want.headers.retain(|(n, _)| n != "content-length");
                        assert_eq!(back, want);
                    }
                    other => panic!("re-encoded frame did not decode: {other:?}"),
                }
            }
            Ok(Some(Decoded::HeartBeat)) => {}
            Ok(None) if !rest.is_empty() => {
                buf.extend_from_slice(rest);
                rest = &[];
            }
            Ok(None) | Err(_) => return,
        }
    }
});
