//! Codec benchmarks: the per-reading CPU cost of the opcode protocol.
//!
//! - `submit_decode/<variant>/<size>`: decoding one SUBMIT frame of 60 B, 120 B and ~2.5 KB,
//!   all variants in one group so the report compares them on the same frames in the same run:
//!   - `serde_json_raw`: [`Inbound::decode`], the production path (serde_json, borrowed
//!     fields, `d` kept as a `RawValue`, byte-for-byte, no copy);
//!   - `simd_borrowed`: [`decode_simd`], simd-json's borrowed value with reused buffers, `d`
//!     re-serialised into a new `Vec`;
//!   - `simd_serde_typed`: `simd_json::serde::from_slice_with_buffers` into a typed envelope
//!     with borrowed fields, `d` as a borrowed value re-serialised into a reused buffer;
//!   - `simd_tape`: `simd_json::fill_tape_padded` into a reused tape (no internal input
//!     copy, no value tree), `d` re-serialised from the tape into a reused buffer;
//!   - `simd_tape_raw_d`: the same tape parse for validation, `op` and `t`, with `d` sliced
//!     byte-for-byte from the frame using simd-json's stage-1 structural indexes, so it hands
//!     on the same bytes as production does.
//!
//!   Every variant does the same SUBMIT checks as production (op 6, `t` normalised to upper
//!   case, `d` an object or array) and yields `d` as bytes.
//! - `dispatch_encode/template_fill/120B`: [`dispatch_template`] then `.fill(seq)`, as the
//!   front-end and the stream owner do for each reading.
//! - `submit_to_dispatch/serde_json_raw/120B`: decode + template + fill for one reading, the
//!   whole per-reading codec cost (the issue's target is < 1 µs).
//!
//! Run: `cargo bench --bench codec -- --warm-up-time 1 --measurement-time 3`
//! (every group runs 1 s warm-up, 3 s measurement, 30 samples by default; see `config`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use serde::Deserialize;
use serde_json::value::RawValue;
use simd_json::prelude::*;
use std::borrow::Cow;
use std::hint::black_box;
use std::time::Duration;

use sensorgate::frontend::opcode::frame::decode_simd;
use sensorgate::frontend::opcode::{dispatch_template, Inbound};

const UID: &str = "8e864e3a-979a-4d04-b4e9-b6d020f20ba0";

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

/// A SUBMIT frame `{"op":6,"t":"<t>","d":{<fields>,"pad":"xx…"}}` padded to exactly `len`
/// bytes with the `pad` string (omitted when `len` is `None`).
fn submit(t: &str, fields: &str, len: Option<usize>) -> Vec<u8> {
    let bare = format!(r#"{{"op":6,"t":"{t}","d":{{{fields}}}}}"#);
    let Some(len) = len else {
        return bare.into_bytes();
    };
    let overhead = bare.len() + r#","pad":"""#.len();
    assert!(len >= overhead, "{len} is too short for {bare}");
    let pad = "x".repeat(len - overhead);
    let frame = format!(r#"{{"op":6,"t":"{t}","d":{{{fields},"pad":"{pad}"}}}}"#);
    assert_eq!(frame.len(), len);
    frame.into_bytes()
}

/// The three frame sizes of the issue.
fn frames() -> Vec<(&'static str, Vec<u8>)> {
    let small = submit("HEART_RATE", r#""val":95"#, Some(60));
    let medium = submit(
        "HEART_RATE",
        r#""ts":"2022-05-04T10:26:11.268507+01:00","val":95"#,
        Some(120),
    );
    // 200 accelerometer samples, deterministic, eight decimals each.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let samples: Vec<String> = (0..200)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let v = (x >> 11) as f64 / (1u64 << 53) as f64 * 40.0 - 20.0;
            format!("{v:.8}")
        })
        .collect();
    let large = submit(
        "ACCELERATION",
        &format!(
            r#""ts":"2022-05-04T10:26:11.268507+01:00","val":[{}]"#,
            samples.join(",")
        ),
        None,
    );
    let large_name: &'static str = Box::leak(format!("{}B", large.len()).into_boxed_str());
    vec![("60B", small), ("120B", medium), (large_name, large)]
}

/// What every variant yields for a SUBMIT: the opcode, the upper-cased type and `d`'s bytes.
#[derive(Debug, PartialEq)]
struct Submit<'t, D> {
    op: u64,
    t: Cow<'t, str>,
    d: D,
}

/// Production's SUBMIT checks, repeated here for the simd-json variants (the real ones are
/// private to the crate): `t` 1-64 of `[A-Za-z0-9_]`, upper-cased (allocating only when it
/// has lower-case letters, as production does); `d` an object or array.
fn submit_parts<'t, D: AsRef<[u8]>>(
    op: u64,
    t: Option<Cow<'t, str>>,
    d: Option<D>,
) -> Option<Submit<'t, D>> {
    if op != 6 {
        return None;
    }
    let d = d?;
    if !matches!(d.as_ref().first(), Some(b'{' | b'[')) {
        return None;
    }
    let t = t?;
    if t.is_empty() || t.len() > 64 || !t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    let t = if t.bytes().any(|b| b.is_ascii_lowercase()) {
        Cow::Owned(t.to_ascii_uppercase())
    } else {
        t
    };
    Some(Submit { op, t, d })
}

/// `Inbound::decode`, the production path, with the frame parser's UTF-8 check before it.
fn decode_serde_json(text: &[u8]) -> Option<Submit<'_, &[u8]>> {
    match Inbound::decode(std::str::from_utf8(text).ok()?).ok()? {
        Inbound::Submit { t, d } => Some(Submit {
            op: 6,
            t,
            d: d.get().as_bytes(),
        }),
        _ => None,
    }
}

/// `frame::decode_simd` as the crate has it.
fn decode_simd_borrowed<'t>(
    text: &[u8],
    scratch: &mut Vec<u8>,
    buffers: &mut simd_json::Buffers,
) -> Option<Submit<'t, Vec<u8>>> {
    let (op, t, d) = decode_simd(text, scratch, buffers).ok()?;
    submit_parts(op, t.map(Cow::Owned), d)
}

#[derive(Deserialize)]
// simd-json's borrowed value deserializes only from its own lifetime: `'a` is `'de`.
#[serde(bound(deserialize = "'a: 'de"))]
struct SimdEnvelope<'a> {
    op: u64,
    #[serde(borrow, default)]
    t: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    d: Option<simd_json::BorrowedValue<'a>>,
}

/// simd-json's serde deserializer into a typed envelope with borrowed fields; `d`
/// re-serialised into `out`.
fn decode_simd_typed<'s>(
    text: &[u8],
    scratch: &'s mut Vec<u8>,
    buffers: &mut simd_json::Buffers,
    out: &'s mut Vec<u8>,
) -> Option<Submit<'s, &'s [u8]>> {
    scratch.clear();
    scratch.extend_from_slice(text);
    let env: SimdEnvelope<'s> = simd_json::serde::from_slice_with_buffers(scratch, buffers).ok()?;
    out.clear();
    let d = match &env.d {
        Some(d) => {
            d.write(out).ok()?;
            Some(&out[..])
        }
        None => None,
    };
    submit_parts(env.op, env.t, d)
}

/// Reusable state for the tape decoders: a padded copy of the frame, simd-json's buffers and
/// a tape whose allocation is kept from one frame to the next.
struct TapeDecoder {
    scratch: Vec<u8>,
    buffers: simd_json::Buffers,
    tape: Option<simd_json::Tape<'static>>,
    out: Vec<u8>,
}

type TapeValue<'tape, 'input> = simd_json::value::tape::Value<'tape, 'input>;

impl TapeDecoder {
    fn new() -> Self {
        Self {
            scratch: Vec::with_capacity(4096),
            buffers: simd_json::Buffers::new(4096),
            tape: Some(simd_json::Tape(Vec::with_capacity(1024))),
            out: Vec::with_capacity(4096),
        }
    }

    /// Copies `text` into the padded scratch and parses it onto the reused tape (no further
    /// copy: the padding is ours). `read` gets the root value (`None` if the frame is not
    /// JSON), the stage-1 structural indexes and `self.out`.
    fn with_tape<R>(
        &mut self,
        text: &[u8],
        read: impl FnOnce(Option<TapeValue<'_, '_>>, &[u32], &mut Vec<u8>) -> R,
    ) -> R {
        let len = text.len();
        self.scratch.clear();
        self.scratch.extend_from_slice(text);
        self.scratch.resize(len + simd_json::INPUT_PADDING, b' ');
        let mut tape = self
            .tape
            .take()
            .unwrap_or_else(simd_json::Tape::null)
            .reset();
        let parsed =
            simd_json::fill_tape_padded(&mut self.scratch, len, &mut self.buffers, &mut tape);
        let value = parsed.is_ok().then(|| tape.as_value());
        let result = read(value, self.buffers.structural_indexes(), &mut self.out);
        self.tape = Some(tape.reset());
        result
    }

    /// Tape parse; `d` re-serialised from the tape into `self.out`. Returns the lengths of
    /// `t` and `d` (both borrow the decoder).
    fn decode_reserialised(&mut self, text: &[u8]) -> Option<(usize, usize)> {
        self.with_tape(text, |v, _, out| {
            let v = v?;
            out.clear();
            let d = match v.get("d") {
                Some(d) => d.write(out).ok().map(|()| &out[..]),
                None => None,
            };
            let op = v.get("op")?.as_u64()?;
            let t = v.get("t").and_then(|t| t.into_string()).map(Cow::Borrowed);
            submit_parts(op, t, d).map(|s| (s.t.len(), s.d.len()))
        })
    }

    /// [`Self::decode_reserialised`], returning what it decoded (for the checks).
    fn decode_reserialised_owned(&mut self, text: &[u8]) -> Option<Submit<'static, Vec<u8>>> {
        self.decode_reserialised(text)?;
        let Submit { op, t, .. } = self.decode_raw_d(text)?;
        Some(Submit {
            op,
            t: Cow::Owned(t.into_owned()),
            d: self.out.clone(),
        })
    }

    /// Tape parse for validation and `op`; `t` and `d` borrowed from `text`, found by their
    /// structural indexes (`t` is taken from the tape when it had escapes). `d` is
    /// byte-for-byte what the client sent, as in production.
    fn decode_raw_d<'t>(&mut self, text: &'t [u8]) -> Option<Submit<'t, &'t [u8]>> {
        self.with_tape(text, |v, structurals, _| {
            let v = v?;
            let op = v.get("op")?.as_u64()?;
            let [t_at, d_at] = member_spans(text, structurals, [br#""t""#, br#""d""#])?;
            let t = match (v.get("t").and_then(|t| t.into_string()), t_at) {
                // The raw string less its quotes is the value when it had no escapes.
                (Some(t), Some((from, to))) => Some(match text.get(from + 1..to - 1) {
                    Some(raw) if raw == t.as_bytes() => {
                        Cow::Borrowed(std::str::from_utf8(raw).ok()?)
                    }
                    _ => Cow::Owned(t.to_owned()),
                }),
                _ => None,
            };
            submit_parts(op, t, d_at.map(|(from, to)| &text[from..to]))
        })
    }
}

/// The byte ranges of the values of the top-level members whose keys are exactly `keys`
/// (quotes included, no escapes), found from simd-json's stage-1 structural indexes of a
/// document already validated as JSON (so a top-level object is
/// `{ key : value (, key : value)* }`). Objects and arrays end at their matching bracket;
/// scalars at the next structural character, less trailing whitespace. The first match of
/// each key counts (production's serde_json refuses a duplicate `t` or `d`). `None` if the
/// document is not an object.
fn member_spans<const N: usize>(
    text: &[u8],
    idx: &[u32],
    keys: [&[u8]; N],
) -> Option<[Option<(usize, usize)>; N]> {
    let at = |i: usize| idx.get(i).map(|&p| p as usize);
    if text.get(at(0)?) != Some(&b'{') {
        return None;
    }
    let mut found = [None; N];
    let mut i = 1;
    loop {
        let key_at = at(i)?;
        if text[key_at] == b'}' {
            return Some(found);
        }
        let colon = at(i + 1)?;
        let value_at = at(i + 2)?;
        // `j`: the index of the value's last structural.
        let mut j = i + 2;
        let container = matches!(text[value_at], b'{' | b'[');
        if container {
            let mut depth = 0usize;
            loop {
                match text[at(j)?] {
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        let key = text[key_at..colon].trim_ascii_end();
        if let Some(k) = keys.iter().position(|&k| k == key) {
            if found[k].is_none() {
                let end = if container {
                    at(j)? + 1
                } else {
                    value_at + text[value_at..at(j + 1)?].trim_ascii_end().len()
                };
                found[k] = Some((value_at, end));
                if found.iter().all(Option::is_some) {
                    return Some(found);
                }
            }
        }
        // Past the value: a ',' then the next key, or the closing '}'.
        match text[at(j + 1)?] {
            b',' => i = j + 2,
            _ => return Some(found),
        }
    }
}

/// Every variant must agree with production on the meaning of every frame before any of
/// them is timed: same op and type, and `d` equal as JSON (byte-equal for the raw ones).
fn check_variants_agree(frames: &[(&str, Vec<u8>)]) {
    let mut scratch = Vec::new();
    let mut buffers = simd_json::Buffers::default();
    let mut out = Vec::new();
    let mut tape = TapeDecoder::new();
    let json = |d: &[u8]| serde_json::from_slice::<serde_json::Value>(d).expect("d is JSON");
    for (name, text) in frames {
        let want = decode_serde_json(text).unwrap_or_else(|| panic!("{name} is a SUBMIT"));
        let want_d = json(want.d);
        let borrowed = decode_simd_borrowed(text, &mut scratch, &mut buffers).expect(name);
        assert_eq!((borrowed.op, &borrowed.t), (want.op, &want.t), "{name}");
        assert_eq!(json(&borrowed.d), want_d, "simd_borrowed {name}");
        let typed = decode_simd_typed(text, &mut scratch, &mut buffers, &mut out).expect(name);
        assert_eq!((typed.op, &typed.t), (want.op, &want.t), "{name}");
        assert_eq!(json(typed.d), want_d, "simd_serde_typed {name}");
        let reser = tape.decode_reserialised_owned(text).expect(name);
        assert_eq!((reser.op, &reser.t), (want.op, &want.t), "{name}");
        assert_eq!(json(&reser.d), want_d, "simd_tape {name}");
        let raw = tape.decode_raw_d(text).expect(name);
        assert!(
            matches!(raw.t, Cow::Borrowed(_)),
            "simd_tape_raw_d borrows t"
        );
        assert_eq!(raw, want, "simd_tape_raw_d {name}");
    }
    // The raw-d walk on member orders, whitespace and nesting production accepts.
    for text in [
        r#"{"d":[0.1,{"a":[1,2]},9.8],"t":"ACCELERATION","op":6,"extra":true}"#,
        r#" { "op" : 6 , "t" : "steps" , "d" : { "val" : 95 , "k":"}]" } } "#,
        r#"{"op":6,"x":{"d":{}},"t":"X","d":{"v":"\"d\""}}"#,
        r#"{"op":6,"t":"st\u0065ps","d":[]}"#,
    ] {
        assert_eq!(
            tape.decode_raw_d(text.as_bytes()),
            decode_serde_json(text.as_bytes()),
            "{text}"
        );
    }
    assert_eq!(tape.decode_raw_d(br#"{"op":6,"t":"X","d":5}"#), None);
    assert_eq!(tape.decode_raw_d(br#"{"op":6,"t":"X","d":{}"#), None);
}

fn submit_decode(c: &mut Criterion) {
    let frames = frames();
    check_variants_agree(&frames);
    let mut group = c.benchmark_group("submit_decode");
    group.throughput(Throughput::Elements(1));
    for (size, text) in &frames {
        let text = &text[..];
        group.bench_with_input(BenchmarkId::new("serde_json_raw", size), text, |b, text| {
            b.iter(|| black_box(decode_serde_json(black_box(text))))
        });
        group.bench_with_input(BenchmarkId::new("simd_borrowed", size), text, |b, text| {
            let mut scratch = Vec::with_capacity(4096);
            let mut buffers = simd_json::Buffers::new(4096);
            b.iter(|| {
                black_box(decode_simd_borrowed(
                    black_box(text),
                    &mut scratch,
                    &mut buffers,
                ))
            })
        });
        group.bench_with_input(
            BenchmarkId::new("simd_serde_typed", size),
            text,
            |b, text| {
                let mut scratch = Vec::with_capacity(4096);
                let mut buffers = simd_json::Buffers::new(4096);
                let mut out = Vec::with_capacity(4096);
                b.iter(|| {
                    let s =
                        decode_simd_typed(black_box(text), &mut scratch, &mut buffers, &mut out);
                    black_box(s.map(|s| (s.t.len(), s.d.len())))
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("simd_tape", size), text, |b, text| {
            let mut tape = TapeDecoder::new();
            b.iter(|| black_box(tape.decode_reserialised(black_box(text))))
        });
        group.bench_with_input(
            BenchmarkId::new("simd_tape_raw_d", size),
            text,
            |b, text| {
                let mut tape = TapeDecoder::new();
                b.iter(|| black_box(tape.decode_raw_d(black_box(text))))
            },
        );
    }
    group.finish();
}

fn dispatch_encode(c: &mut Criterion) {
    let (_, text) = &frames()[1];
    let text = std::str::from_utf8(text).expect("the frames are UTF-8");
    let Ok(Inbound::Submit { t, d }) = Inbound::decode(text) else {
        panic!("the 120-byte frame is a SUBMIT")
    };
    let mut group = c.benchmark_group("dispatch_encode");
    group.throughput(Throughput::Elements(1));
    let mut seq = 1_000_000u64;
    group.bench_function(BenchmarkId::new("template_fill", "120B"), |b| {
        b.iter(|| {
            seq += 1;
            black_box(dispatch_template(black_box(UID), black_box(&t), black_box(d)).fill(seq))
        })
    });
    group.finish();
}

/// Decode + template + fill, as the connection reader and the stream owner do per reading.
fn submit_to_dispatch_serde(text: &[u8], seq: u64) -> Option<bytes::Bytes> {
    match Inbound::decode(std::str::from_utf8(text).ok()?).ok()? {
        Inbound::Submit { t, d } => Some(dispatch_template(UID, &t, d).fill(seq)),
        _ => None,
    }
}

fn submit_to_dispatch(c: &mut Criterion) {
    let (_, text) = &frames()[1];
    let frame = submit_to_dispatch_serde(text, 73).expect("a DISPATCH");
    let v: serde_json::Value = serde_json::from_slice(&frame).expect("DISPATCH is JSON");
    assert_eq!((v["op"].as_u64(), v["seq"].as_u64()), (Some(5), Some(73)));
    let _: &RawValue = serde_json::from_slice(&frame).expect("DISPATCH is JSON");
    let mut group = c.benchmark_group("submit_to_dispatch");
    group.throughput(Throughput::Elements(1));
    let mut seq = 1_000_000u64;
    group.bench_function(BenchmarkId::new("serde_json_raw", "120B"), |b| {
        b.iter(|| {
            seq += 1;
            black_box(submit_to_dispatch_serde(black_box(text), seq))
        })
    });
    group.finish();
}

criterion_group! {
    name = codec;
    config = config();
    targets = submit_decode, dispatch_encode, submit_to_dispatch
}
criterion_main!(codec);
