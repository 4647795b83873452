//! The WebSocket frame parser must never panic, never ask for fewer bytes than it has, and
//! never return a message larger than its limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::conn::wire::{FrameParser, Message, Parsed};

const MAX: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let mut parser = FrameParser::new(MAX);
    let mut buf = data.to_vec();
    let mut at = 0;
    while at < buf.len() {
        let len = buf.len() - at;
        match parser.parse(&mut buf[at..]) {
            Ok(Parsed::Incomplete(need)) => {
                assert!(need > len);
                return;
            }
            Ok(Parsed::Fragment(used)) => {
                assert!(used > 0 && used <= len);
                at += used;
            }
            Ok(Parsed::Message(message, used)) => {
                let size = match &message {
                    Message::Text(t) => t.len(),
                    Message::Binary(b) => b.len(),
                    _ => 0,
                };
                assert!(size <= MAX);
                assert!(used > 0 && used <= len);
                at += used;
            }
            Err(_) => return,
        }
    }
});
