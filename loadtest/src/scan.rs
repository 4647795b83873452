//! Cheap parsing of incoming server frames. A single-pass walker over the
//! top-level JSON object picks out the fields this tool needs (`op`, `seq`,
//! `uid`, and `ts` / `n` / `heartbeat_interval` inside `d`) and skips
//! everything else without allocating; a serde_json parser with borrowed
//! fields is kept as an alternative (`--parser serde`) for comparison.

use std::borrow::Cow;

/// The fields of a server frame that the load generator looks at.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scanned<'a> {
    pub op: Option<u64>,
    pub seq: Option<u64>,
    pub uid: Option<Cow<'a, str>>,
    /// `d.ts`: the producer's send timestamp (unix nanos).
    pub ts: Option<u64>,
    /// `d.n`: the producer's per-uid counter.
    pub n: Option<u64>,
    /// `d.heartbeat_interval` (HELLO).
    pub heartbeat_interval: Option<u64>,
}

/// Which parser reads incoming frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Parser {
    /// Hand-written single-pass field scanner (default).
    Scan,
    /// serde_json with borrowed fields.
    Serde,
}

impl Parser {
    pub fn parse<'a>(self, text: &'a [u8]) -> Option<Scanned<'a>> {
        match self {
            Parser::Scan => scan(text),
            Parser::Serde => scan_serde(text),
        }
    }
}

/// Scans a frame's JSON text. Returns `None` if it is not a JSON object.
/// Fields of unexpected types are skipped (left `None`), so a foreign `d`
/// never confuses the top-level fields.
pub fn scan(text: &[u8]) -> Option<Scanned<'_>> {
    let mut out = Scanned::default();
    let mut w = Walker { b: text, i: 0 };
    w.object(|w, key| match key {
        b"op" => {
            out.op = w.field_u64()?;
            Some(())
        }
        b"seq" => {
            out.seq = w.field_u64()?;
            Some(())
        }
        b"uid" => {
            out.uid = w.field_str()?;
            Some(())
        }
        b"d" => {
            if w.peek() == Some(b'{') {
                w.object(|w, key| match key {
                    b"ts" => {
                        out.ts = w.field_u64()?;
                        Some(())
                    }
                    b"n" => {
                        out.n = w.field_u64()?;
                        Some(())
                    }
                    b"heartbeat_interval" => {
                        out.heartbeat_interval = w.field_u64()?;
                        Some(())
                    }
                    _ => w.skip_value(),
                })
            } else {
                w.skip_value()
            }
        }
        _ => w.skip_value(),
    })?;
    Some(out)
}

/// The same extraction through serde_json with borrowed fields.
pub fn scan_serde(text: &[u8]) -> Option<Scanned<'_>> {
    #[derive(serde::Deserialize)]
    struct Frame<'a> {
        op: Option<u64>,
        seq: Option<u64>,
        #[serde(borrow)]
        uid: Option<Cow<'a, str>>,
        d: Option<Inner>,
    }
    #[derive(serde::Deserialize)]
    struct Inner {
        ts: Option<u64>,
        n: Option<u64>,
        heartbeat_interval: Option<u64>,
    }
    let f: Frame<'_> = serde_json::from_slice(text).ok()?;
    let d = f.d.unwrap_or(Inner {
        ts: None,
        n: None,
        heartbeat_interval: None,
    });
    Some(Scanned {
        op: f.op,
        seq: f.seq,
        uid: f.uid,
        ts: d.ts,
        n: d.n,
        heartbeat_interval: d.heartbeat_interval,
    })
}

/// The close code carried by a close frame's payload, if any.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [hi, lo, ..] => Some(u16::from_be_bytes([*hi, *lo])),
        _ => None,
    }
}

struct Walker<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walker<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Walks an object, calling `field` with the walker positioned at each
    /// value (after the colon); `field` must consume exactly that value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            let (key, escaped) = self.string_raw()?;
            self.eat(b':')?;
            self.ws();
            // An escaped key never equals one of ours; skip its value.
            if escaped {
                self.skip_value()?;
            } else {
                field(self, key)?;
            }
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A string's raw bytes between the quotes, and whether it had escapes.
    fn string_raw(&mut self) -> Option<(&'a [u8], bool)> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        let mut escaped = false;
        loop {
            j += memchr::memchr2(b'"', b'\\', &self.b[j..])?;
            if self.b[j] == b'"' {
                self.i = j + 1;
                return Some((&self.b[start..j], escaped));
            }
            escaped = true;
            j += 2;
            if j > self.b.len() {
                return None;
            }
        }
    }

    /// A u64 value, or `Some(None)` if the value is of another type (skipped).
    fn field_u64(&mut self) -> Option<Option<u64>> {
        let start = self.i;
        let mut v: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let is_int = self.i > start && !matches!(self.peek(), Some(b'.' | b'e' | b'E'));
        if is_int {
            Some(Some(v))
        } else {
            self.i = start;
            self.skip_value()?;
            Some(None)
        }
    }

    /// A string value, or `Some(None)` if the value is of another type.
    fn field_str(&mut self) -> Option<Option<Cow<'a, str>>> {
        if self.peek()? != b'"' {
            self.skip_value()?;
            return Some(None);
        }
        let start = self.i;
        let (raw, escaped) = self.string_raw()?;
        if escaped {
            let owned: String = serde_json::from_slice(&self.b[start..self.i]).ok()?;
            Some(Some(Cow::Owned(owned)))
        } else {
            Some(Some(Cow::Borrowed(std::str::from_utf8(raw).ok()?)))
        }
    }

    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string_raw().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string_raw()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISPATCH: &[u8] = br#"{"op":5,"d":{"ts":1700000000000000000,"n":17,"p":"xxxx"},"uid":"load-demo-3","seq":73,"t":"HEART_RATE"}"#;

    fn both(text: &[u8]) -> Option<Scanned<'_>> {
        let a = scan(text);
        let b = scan_serde(text);
        if a.is_some() && b.is_some() {
            assert_eq!(
                a,
                b,
                "parsers disagree on {}",
                String::from_utf8_lossy(text)
            );
        }
        a
    }

    #[test]
    fn dispatch_fields() {
        let s = both(DISPATCH).unwrap();
        assert_eq!(s.op, Some(5));
        assert_eq!(s.seq, Some(73));
        assert_eq!(s.uid.as_deref(), Some("load-demo-3"));
        assert!(matches!(s.uid, Some(Cow::Borrowed(_))));
        assert_eq!(s.ts, Some(1_700_000_000_000_000_000));
        assert_eq!(s.n, Some(17));
    }

    #[test]
    fn field_order_and_whitespace_do_not_matter() {
        let text = br#" { "seq" : 9 , "t":"HEART_RATE", "uid" : "u" , "d" : { "p" : "}" , "n" : 2 , "ts" : 3 } , "op" : 5 } "#;
        let s = both(text).unwrap();
        assert_eq!(
            (s.op, s.seq, s.ts, s.n),
            (Some(5), Some(9), Some(3), Some(2))
        );
        assert_eq!(s.uid.as_deref(), Some("u"));
    }

    #[test]
    fn lookalike_keys_inside_d_are_not_top_level() {
        let text = br#"{"op":5,"d":{"seq":1,"uid":"fake","x":{"seq":2},"s":"\"seq\":3"},"uid":"real","seq":4}"#;
        let s = both(text).unwrap();
        assert_eq!(s.seq, Some(4));
        assert_eq!(s.uid.as_deref(), Some("real"));
        assert_eq!((s.ts, s.n), (None, None));
    }

    #[test]
    fn nested_ts_is_not_taken() {
        let s = scan(br#"{"op":5,"d":{"inner":{"ts":1,"n":2}},"uid":"u","seq":1}"#).unwrap();
        assert_eq!((s.ts, s.n), (None, None));
    }

    #[test]
    fn escaped_uid_is_decoded() {
        let s = both(br#"{"op":5,"d":{},"uid":"a\"b\u0041","seq":1}"#).unwrap();
        assert_eq!(s.uid.as_deref(), Some("a\"bA"));
    }

    #[test]
    fn non_object_d_and_odd_types() {
        let s = scan(br#"{"op":5,"d":[1,{"a":"]"}],"uid":7,"seq":1.5,"t":null}"#).unwrap();
        assert_eq!(s.op, Some(5));
        assert_eq!(s.uid, None);
        assert_eq!(s.seq, None);
        let s = scan(br#"{"op":5,"d":"str","seq":-1}"#).unwrap();
        assert_eq!(s.seq, None);
    }

    #[test]
    fn hello_ready_ack() {
        let s = both(br#"{"op":2,"d":{"heartbeat_interval":40000}}"#).unwrap();
        assert_eq!((s.op, s.heartbeat_interval), (Some(2), Some(40000)));
        assert_eq!(both(br#"{"op":4}"#).unwrap().op, Some(4));
        assert_eq!(both(br#"{"op":1}"#).unwrap().op, Some(1));
        assert_eq!(both(br#"{}"#).unwrap().op, None);
    }

    #[test]
    fn malformed_is_rejected() {
        for text in [
            &b""[..],
            b"[]",
            b"{",
            br#"{"op":5"#,
            br#"{"op":5,}"#,
            br#"{"op" 5}"#,
            br#"{"uid":"unterminated}"#,
            br#"{"op":99999999999999999999999}"#,
        ] {
            assert_eq!(scan(text), None, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[0x0f, 0xa1, b'x']), Some(4001));
        assert_eq!(close_code(&[0x03]), None);
        assert_eq!(close_code(&[]), None);
    }

    /// Both parsers read the load generator's own DISPATCH frames alike (their speed is a
    /// benchmark matter, not a test's).
    #[test]
    fn parsers_agree_on_generated_frames() {
        let mut frames = Vec::new();
        let mut b = Vec::new();
        let builder = crate::frames::SubmitBuilder::new(120);
        for n in 0..1_000u64 {
            builder.build(&mut b, crate::frames::unix_nanos(), n);
            let d = &b[br#"{"op":6,"t":"HEART_RATE","d":"#.len()..b.len() - 1];
            let text = format!(
                r#"{{"op":5,"d":{},"uid":"load-demo-{}","seq":{},"t":"HEART_RATE"}}"#,
                std::str::from_utf8(d).unwrap(),
                n % 4,
                n + 1
            );
            frames.push(text.into_bytes());
        }
        for f in &frames {
            let a = Parser::Scan.parse(f).unwrap();
            let b = Parser::Serde.parse(f).unwrap();
            assert_eq!((a.seq, a.n), (b.seq, b.n));
            assert!(a.seq.is_some() && a.n.is_some());
        }
    }
}
