//! BIMserver's notification endpoint (seed 003): the `/stream` socket's messages
//! ([`frame`]: welcome, token, endpoint id, errors, heartbeats and the pushes), the JSON API
//! that registers endpoints for notifications ([`api`]), and what backends publish to raise
//! them ([`backend`]). Pure and synchronous, like every front-end: the connection and the
//! HTTP routes carry out what these decode.

pub mod api;
pub mod backend;
pub mod frame;
