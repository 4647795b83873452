//! The opcode protocol's frame decoder and session rules must never panic on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::frontend::opcode::{Inbound, Session};

fuzz_target!(|data: &[u8]| {
    // As the frame parser hands text on: checked UTF-8.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(frame) = Inbound::decode(text) {
        let _ = Session::new().step(frame);
    }
});
