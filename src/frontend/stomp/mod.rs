//! STOMP 1.0, 1.1 and 1.2 (seeds 000 and 002): the byte grammar ([`codec`]) and the typed
//! frames a session acts on ([`frame`]). Pure and synchronous, like every front-end.

pub mod codec;
pub mod destination;
pub mod frame;
