//! Seed 001's opcode protocol, served at `/connect`: frames ([`frame`]) and the session
//! rules ([`session`]). The connection layer drives them; nothing here does I/O.

pub mod frame;
pub mod session;

pub use frame::{dispatch_template, DecodeError, IdentifyType, Inbound, Outbound};
pub use session::{Session, Step, Violation};
