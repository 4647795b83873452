//! `POST /json`: BIMserver's JSON API for endpoint registrations (the same calls a `/stream`
//! socket may send). Answers 200 with the reply envelope, exceptions included, as BIMserver
//! does; 400 for a body that is no envelope, 413 for one over `max_frame_bytes`. Browsers
//! call it cross-origin (BIMserver's JavaScript client runs on other hosts), and the token
//! travels in the body, not a cookie, so any origin may call it.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCESS_CONTROL_ALLOW_ORIGIN};
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;

use super::http::{json, read_body, Body};
use super::App;
use crate::frontend::endpoint::api::{encode_refusal, Envelope};

pub(super) async fn call(req: Request<Incoming>, app: Arc<App>) -> Response<Body> {
    let limit = app.ctx.limits.max_frame_bytes;
    let (status, reply) = match read_body(req, limit, &app).await {
        Err(e) => (
            e.status(),
            encode_refusal(&format!("{} (max_frame_bytes)", e.message(limit))),
        ),
        Ok(body) => match Envelope::parse(&body) {
            Ok(envelope) => (
                StatusCode::OK,
                crate::conn::execute_json(&app.ctx, &envelope, None),
            ),
            Err(why) => (
                StatusCode::BAD_REQUEST,
                encode_refusal(&format!("Invalid request: {why}")),
            ),
        },
    };
    let mut r = json(status, reply);
    r.headers_mut()
        .insert(ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    r
}

/// The CORS preflight of a cross-origin `POST /json` with a JSON body.
pub(super) fn preflight() -> Response<Body> {
    let mut r = json(StatusCode::NO_CONTENT, Vec::new());
    let h = r.headers_mut();
    h.remove(hyper::header::CONTENT_TYPE);
    for (name, value) in [
        (ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        (hyper::header::ACCESS_CONTROL_ALLOW_METHODS, "POST, OPTIONS"),
        (hyper::header::ACCESS_CONTROL_ALLOW_HEADERS, "Content-Type"),
        (hyper::header::ACCESS_CONTROL_MAX_AGE, "86400"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    r
}
