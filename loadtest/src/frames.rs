//! Outgoing protocol frames: the exact JSON text this tool sends (IDENTIFY,
//! HEARTBEAT, REPLAY, close) and the SUBMIT builder that pads each reading to
//! an exact frame size.

/// `{"op":0}`: the client heartbeat.
pub const HEARTBEAT: &[u8] = br#"{"op":0}"#;

/// Which side of the gateway a connection identifies as (IDENTIFY `type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientKind {
    /// A user's device submitting readings (`type: 0`, user token).
    Producer,
    /// A developer's backend receiving readings (`type: 1`, developer token).
    Consumer,
}

impl ClientKind {
    fn wire_type(self) -> u8 {
        match self {
            ClientKind::Producer => 0,
            ClientKind::Consumer => 1,
        }
    }
}

/// `{"op":3,"d":{"token":"…","type":0|1}}`.
pub fn identify(token: &str, kind: ClientKind) -> Vec<u8> {
    let token = serde_json::Value::String(token.to_owned()).to_string();
    format!(
        r#"{{"op":3,"d":{{"token":{token},"type":{}}}}}"#,
        kind.wire_type()
    )
    .into_bytes()
}

/// `{"op":7,"d":{"after":N}}` or `{"op":7,"d":{"after":N,"before":M}}`.
pub fn replay(after: u64, before: Option<u64>) -> Vec<u8> {
    match before {
        Some(before) => format!(r#"{{"op":7,"d":{{"after":{after},"before":{before}}}}}"#),
        None => format!(r#"{{"op":7,"d":{{"after":{after}}}}}"#),
    }
    .into_bytes()
}

const SUBMIT_HEAD: &[u8] = br#"{"op":6,"t":"HEART_RATE","d":{"ts":"#;
const SUBMIT_N: &[u8] = br#","n":"#;
const SUBMIT_PAD: &[u8] = br#","p":""#;
const SUBMIT_TAIL: &[u8] = br#""}}"#;

/// Builds SUBMIT frames `{"op":6,"t":"HEART_RATE","d":{"ts":T,"n":N,"p":"xx…"}}`
/// whose JSON text is exactly `target` bytes long (the `p` string absorbs the
/// difference), or as short as possible when `target` is below the minimum.
#[derive(Clone, Debug)]
pub struct SubmitBuilder {
    target: usize,
}

impl SubmitBuilder {
    pub fn new(target: usize) -> Self {
        Self { target }
    }

    /// Length of a SUBMIT frame with an empty pad for these field values.
    pub fn unpadded_len(ts: u64, n: u64) -> usize {
        SUBMIT_HEAD.len()
            + decimal_len(ts)
            + SUBMIT_N.len()
            + decimal_len(n)
            + SUBMIT_PAD.len()
            + SUBMIT_TAIL.len()
    }

    /// Replaces `out` with the SUBMIT frame for reading `n` stamped `ts`.
    pub fn build(&self, out: &mut Vec<u8>, ts: u64, n: u64) {
        let pad = self.target.saturating_sub(Self::unpadded_len(ts, n));
        let mut digits = itoa::Buffer::new();
        out.clear();
        out.extend_from_slice(SUBMIT_HEAD);
        out.extend_from_slice(digits.format(ts).as_bytes());
        out.extend_from_slice(SUBMIT_N);
        out.extend_from_slice(digits.format(n).as_bytes());
        out.extend_from_slice(SUBMIT_PAD);
        out.resize(out.len() + pad, b'x');
        out.extend_from_slice(SUBMIT_TAIL);
    }
}

fn decimal_len(mut v: u64) -> usize {
    let mut len = 1;
    while v >= 10 {
        v /= 10;
        len += 1;
    }
    len
}

/// Current wall-clock time as unix nanoseconds (the `ts` carried by SUBMIT).
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_is_exact_size_and_valid_json() {
        let b = SubmitBuilder::new(120);
        let mut out = Vec::new();
        for (ts, n) in [
            (1_700_000_000_000_000_000, 0),
            (1_700_000_000_000_000_000, 17),
            (u64::MAX, 999_999_999),
            (5, 1),
        ] {
            b.build(&mut out, ts, n);
            assert_eq!(out.len(), 120, "{}", String::from_utf8_lossy(&out));
            let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(v["op"], 6);
            assert_eq!(v["t"], "HEART_RATE");
            assert_eq!(v["d"]["ts"], ts);
            assert_eq!(v["d"]["n"], n);
        }
    }

    #[test]
    fn submit_layout_is_as_documented() {
        let mut out = Vec::new();
        SubmitBuilder::new(0).build(&mut out, 1_700_000_000_000_000_000, 17);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"op":6,"t":"HEART_RATE","d":{"ts":1700000000000000000,"n":17,"p":""}}"#
        );
        assert_eq!(
            out.len(),
            SubmitBuilder::unpadded_len(1_700_000_000_000_000_000, 17)
        );
    }

    #[test]
    fn submit_below_minimum_is_unpadded() {
        let mut out = Vec::new();
        SubmitBuilder::new(10).build(&mut out, 123, 4);
        assert_eq!(out.len(), SubmitBuilder::unpadded_len(123, 4));
        assert!(out.ends_with(br#","p":""}}"#));
    }

    #[test]
    fn submit_large_sizes() {
        let mut out = Vec::new();
        for size in [200, 1024, 65_536] {
            SubmitBuilder::new(size).build(&mut out, unix_nanos(), 42);
            assert_eq!(out.len(), size);
        }
    }

    #[test]
    fn decimal_lengths() {
        assert_eq!(decimal_len(0), 1);
        assert_eq!(decimal_len(9), 1);
        assert_eq!(decimal_len(10), 2);
        assert_eq!(decimal_len(u64::MAX), 20);
    }

    #[test]
    fn control_frames() {
        assert_eq!(
            identify("a\"b", ClientKind::Consumer),
            br#"{"op":3,"d":{"token":"a\"b","type":1}}"#.to_vec()
        );
        assert_eq!(
            identify("tok", ClientKind::Producer),
            br#"{"op":3,"d":{"token":"tok","type":0}}"#.to_vec()
        );
        assert_eq!(replay(0, None), br#"{"op":7,"d":{"after":0}}"#.to_vec());
        assert_eq!(
            replay(5, Some(9)),
            br#"{"op":7,"d":{"after":5,"before":9}}"#.to_vec()
        );
    }
}
