//! The wire protocols, pure and synchronous: frames in, frames out, session rules. No I/O,
//! no clock, no hub calls: a front-end tells its connection what a frame means and the
//! connection acts on it.

pub mod close;
pub mod endpoint;
pub mod opcode;
pub mod stomp;

pub use close::CloseCode;
