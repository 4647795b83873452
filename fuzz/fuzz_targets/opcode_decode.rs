//! The opcode protocol's frame decoder and session rules must never panic on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::frontend::opcode::{Inbound, Session};

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = Inbound::decode(data) {
        let _ = Session::new().step(frame);
    }
});
