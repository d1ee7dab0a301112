//! Hostile input: whatever a client sends in the material of a key (header values of any bytes
//! and length, query strings, paths, `Idempotency-Key` values), the layer never panics, answers
//! 200 or 400 (never 500), every lock name keeps its namespace and a bounded length, distinct
//! material never shares a lock, and request material never chooses the Redis Cluster slot.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use http::{HeaderValue, Method, Request, StatusCode};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;
use tower_lock::backend::LockName;
use tower_lock::idempotency::{self, IdempotencyKey};
use tower_lock::key::{Header, KeyExtractor, KeyRejectionKind, KeyTemplate};
use tower_lock::{LockLayer, LockPolicy, MemoryBackend};

use common::{Gate, NS, answer, echo, serve};

/// The longest escaped key kept as it is (the default `max_key_len`); longer ones become a
/// digest, which is shorter.
const MAX_KEY_LEN: usize = 256;

fn layer() -> LockLayer<Header, MemoryBackend> {
    LockLayer::new(MemoryBackend::new(), Header::new("x-key")).namespace(NS)
}

fn parts_with(headers: &[(&str, &[u8])], uri: &str) -> http::request::Parts {
    let mut request = Request::post(uri);
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    request.body(()).unwrap().into_parts().0
}

/// The lock name `extractor` gives a request with these headers, or its rejection's kind.
fn name_of(
    extractor: &impl KeyExtractor,
    headers: &[(&str, &[u8])],
    uri: &str,
) -> Result<LockName, KeyRejectionKind> {
    let key = extractor
        .extract(&parts_with(headers, uri))
        .map_err(|rejection| rejection.kind())?
        .expect("a key");
    Ok(layer().lock_name(&key))
}

/// Redis Cluster's key slot: CRC16 (XMODEM) of the hash tag (the text between the first `{`
/// and the next `}`, when not empty), else of the whole key, modulo 16384.
fn cluster_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = bytes[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &bytes[open + 1..open + 1 + close])
        })
        .unwrap_or(bytes);
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// What every lock name must be, whatever the material: the namespace, then one hash tag made
/// only of the escaped key (no `{` or `}` of the material inside it), then nothing; the fence
/// in the same slot; a bounded length.
fn check_name(name: &LockName) -> Result<(), TestCaseError> {
    let lock = name.lock_key();
    prop_assert!(lock.starts_with(NS), "{lock}");
    let tag = &lock[NS.len()..];
    prop_assert!(tag.starts_with('{') && tag.ends_with('}'), "{lock}");
    let inside = &tag[1..tag.len() - 1];
    prop_assert!(!inside.is_empty(), "an empty hash tag: {lock}");
    prop_assert!(
        !inside.contains(['{', '}']),
        "material in the hash tag: {lock}"
    );
    prop_assert!(
        inside.len() <= MAX_KEY_LEN,
        "{} bytes: {lock}",
        inside.len()
    );
    prop_assert_eq!(name.fence_key(), format!("{lock}:fence"));
    prop_assert_eq!(cluster_slot(lock), cluster_slot(name.fence_key()));
    Ok(())
}

/// Bytes a header value can carry: visible ASCII, space, tab, and obs-text (0x80–0xFF, not
/// UTF-8); never CR, LF, NUL or other controls (`http` refuses them, see below).
fn header_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        4 => 0x20u8..=0x7e,
        1 => Just(b'\t'),
        1 => Just(b'{'),
        1 => Just(b'}'),
        1 => Just(b'%'),
        1 => Just(b':'),
        2 => 0x80u8..=0xff,
    ];
    prop::collection::vec(byte, 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn header_material_keeps_the_namespace_a_bounded_length_and_its_own_slot(
        value in header_bytes(600),
    ) {
        let name = name_of(&Header::new("x-key"), &[("x-key", &value)], "/").unwrap();
        check_name(&name)?;
    }

    #[test]
    fn distinct_header_values_never_share_a_lock(
        a in header_bytes(300),
        b in header_bytes(300),
    ) {
        // `http` trims nothing inside a value: distinct bytes are distinct values.
        prop_assume!(a != b);
        let header = Header::new("x-key");
        let first = name_of(&header, &[("x-key", &a)], "/").unwrap();
        let second = name_of(&header, &[("x-key", &b)], "/").unwrap();
        prop_assert_ne!(first, second);
    }

    /// Two header values joined by a template: distinct pairs never share a lock, even when
    /// the values are made of the separator.
    #[test]
    fn distinct_pairs_of_header_values_never_share_a_lock(
        pairs in prop::collection::vec(
            (prop::collection::vec(prop::sample::select(&b":%{}3A-a\xff"[..]), 0..6),
             prop::collection::vec(prop::sample::select(&b":%{}3A-a\xff"[..]), 0..6)),
            2..40,
        ),
    ) {
        let template = KeyTemplate::parse("pair:{header.x-a}:{header.x-b}").unwrap();
        let mut seen: HashMap<LockName, (Vec<u8>, Vec<u8>)> = HashMap::new();
        for (a, b) in pairs {
            let name = name_of(&template, &[("x-a", &a), ("x-b", &b)], "/").unwrap();
            check_name(&name)?;
            if let Some(other) = seen.insert(name.clone(), (a.clone(), b.clone())) {
                prop_assert_eq!(other, (a, b), "{:?}", name);
            }
        }
    }

    /// Any query string: a key or a 400, never a panic.
    #[test]
    fn any_query_string_gives_a_key_or_a_400(query in "[a-z=&%0-9A-F+;{}.:/é?#-]{0,80}") {
        let uri = format!("/?{}", query.replace(['#', '?'], "%23"));
        let Ok(uri) = uri.parse::<http::Uri>() else { return Ok(()); };
        let parts = Request::post(uri).body(()).unwrap().into_parts().0;
        let template = KeyTemplate::parse("q:{query.q}").unwrap();
        match template.extract(&parts) {
            Ok(Some(key)) => check_name(&layer().lock_name(&key))?,
            Ok(None) => {}
            Err(rejection) => prop_assert_ne!(rejection.kind(), KeyRejectionKind::Misconfigured),
        }
    }

    /// Any `Idempotency-Key` value: a key under `idempotency:`, or a 400 — never a panic, never
    /// a 500.
    #[test]
    fn any_idempotency_key_value_gives_a_key_or_a_400(value in header_bytes(300)) {
        match name_of(&IdempotencyKey::new(), &[("idempotency-key", &value)], "/") {
            Ok(name) => {
                check_name(&name)?;
                let key = &name.lock_key()[NS.len() + 1..];
                prop_assert!(key.starts_with("idempotency:") || key.starts_with('#'), "{key}");
            }
            Err(kind) => prop_assert_ne!(kind, KeyRejectionKind::Misconfigured),
        }
    }

    /// A key sent bare and quoted is one key; distinct keys are distinct locks.
    #[test]
    fn a_bare_key_and_its_quoted_form_are_one_lock_and_distinct_keys_are_not(
        a in "[!#$%&'()*+./0-9:;<=>?@A-Z\\[\\]^_`a-z{|}~-]{1,40}",
        b in "[!#$%&'()*+./0-9:;<=>?@A-Z\\[\\]^_`a-z{|}~-]{1,40}",
    ) {
        let key = IdempotencyKey::new();
        let bare = name_of(&key, &[("idempotency-key", a.as_bytes())], "/").unwrap();
        let quoted = format!("\"{a}\"");
        let quoted = name_of(&key, &[("idempotency-key", quoted.as_bytes())], "/").unwrap();
        prop_assert_eq!(&bare, &quoted);
        let other = name_of(&key, &[("idempotency-key", b.as_bytes())], "/").unwrap();
        prop_assert_eq!(a == b, bare == other);
    }
}

#[test]
fn oversized_header_values_get_a_bounded_key() {
    for len in [257, 4096, 65_536, 1 << 20] {
        let value = vec![b'{'; len];
        let name = name_of(&Header::new("x-key"), &[("x-key", &value)], "/").unwrap();
        check_name(&name).unwrap();
        let other = vec![b'}'; len];
        let other = name_of(&Header::new("x-key"), &[("x-key", &other)], "/").unwrap();
        assert_ne!(name, other, "{len} bytes");
    }
}

#[test]
fn empty_header_values_are_one_lock_in_a_non_empty_slot() {
    let name = name_of(&Header::new("x-key"), &[("x-key", b"")], "/").unwrap();
    check_name(&name).unwrap();
}

/// CR, LF and NUL never reach an extractor: `http` refuses them in a header value, and hyper
/// refuses a request carrying them (or an obs-fold) before any service sees it.
#[test]
fn crlf_and_nul_cannot_be_in_a_header_value() {
    for bad in [&b"a\r\nx-key: b"[..], b"a\rb", b"a\nb", b"a\0b"] {
        assert!(HeaderValue::from_bytes(bad).is_err(), "{bad:?}");
    }
}

/// Raw HTTP/1.1 through a real server: hostile header values get 200 (a key), 400 (refused by
/// hyper or by the key), or 431 (too large for hyper; a value it takes gets a digest key) —
/// never a 500, never a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_requests_with_hostile_header_values_get_200_or_4xx() {
    let app = Router::new().route("/work", post(|| async { "ok" }).route_layer(layer()));
    let (base, server) = serve(app).await;
    let address = base.trim_start_matches("http://").to_owned();
    let raw = |header: Vec<u8>| {
        let address = address.clone();
        async move {
            let mut stream = tokio::net::TcpStream::connect(&address).await.unwrap();
            let mut request = b"POST /work HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n".to_vec();
            request.extend_from_slice(&header);
            request.extend_from_slice(b"\r\nconnection: close\r\n\r\n");
            stream.write_all(&request).await.unwrap();
            let mut answer = Vec::new();
            let read = stream.read_to_end(&mut answer);
            tokio::time::timeout(Duration::from_secs(10), read)
                .await
                .expect("no answer")
                .ok();
            String::from_utf8_lossy(answer.get(9..12).unwrap_or_default()).into_owned()
        }
    };
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("plain", b"x-key: a".to_vec(), &["200"]),
        ("braces", b"x-key: {a}".to_vec(), &["200"]),
        ("non-UTF-8", b"x-key: \xff\xfe".to_vec(), &["200"]),
        ("empty", b"x-key:".to_vec(), &["200"]),
        ("bare CR", b"x-key: a\rb".to_vec(), &["400"]),
        ("NUL", b"x-key: a\0b".to_vec(), &["400"]),
        ("obs-fold", b"x-key: a\r\n b".to_vec(), &["400"]),
        (
            "huge",
            [b"x-key: ".to_vec(), vec![b'a'; 200_000]].concat(),
            &["200", "431", "400"],
        ),
        ("twice", b"x-key: a\r\nx-key: b".to_vec(), &["200", "400"]),
    ];
    for (what, header, expected) in cases {
        let status = raw(header).await;
        assert!(
            expected.contains(&status.as_str()),
            "{what}: {status:?}, expected one of {expected:?}"
        );
    }
    server.abort();
}

/// Idempotency-Key through the preset's layer: missing, empty, twice, a list, malformed: 400;
/// quoted and bare: locked, on the same key.
#[tokio::test]
async fn idempotency_key_answers_follow_the_draft() {
    let service = idempotency::layer(MemoryBackend::new())
        .namespace(NS)
        .layer(echo::<String>(Gate::new()));
    let post = |values: &[&[u8]]| {
        let mut request = Request::post("/orders");
        for value in values {
            request = request.header("idempotency-key", HeaderValue::from_bytes(value).unwrap());
        }
        request
    };
    for (values, status) in [
        (&[][..], StatusCode::BAD_REQUEST),
        (&[&b""[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"\"\""[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"\"a\""[..], &b"\"a\""[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"\"a\", \"b\""[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"\"unterminated"[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"has space"[..]][..], StatusCode::BAD_REQUEST),
        (&[&b"\xff"[..]][..], StatusCode::BAD_REQUEST),
    ] {
        let (got, body) = answer(&service, post(values)).await;
        assert_eq!(got, status, "{values:?}: {body}");
    }
    let quoted = answer(&service, post(&[b"\"8e03978e-40d5\""])).await;
    let bare = answer(&service, post(&[b"8e03978e-40d5"])).await;
    assert_eq!(
        quoted,
        (StatusCode::OK, format!("{NS}{{idempotency:8e03978e-40d5}}"))
    );
    assert_eq!(quoted, bare);
}

/// Noise that does not change which route a path is (`//`, `/.`, `/x/..`, a trailing `/`).
const NOISE: &[&str] = &["", "", "/", "/.", "/x/..", "/./", "//", "/a/b/../.."];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any respelling of `/jobs/7/run` takes its lock in a route table (never passes unlocked).
    #[test]
    fn respelled_paths_take_the_routes_lock(noise in prop::collection::vec(prop::sample::select(NOISE), 4)) {
        let path = format!("{}/jobs{}/7{}/run{}", noise[0], noise[1], noise[2], noise[3]);
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (status, key) = runtime.block_on(async {
            let routes = tower_lock::LockRoutes::new(MemoryBackend::new())
                .defaults(|layer| layer.namespace(NS))
                .route("/jobs/{id}/run", LockPolicy::template("job:{path.id}").unwrap())
                .unwrap();
            let service = routes.layer(echo::<String>(Gate::new()));
            answer(&service, Request::builder().method(Method::POST).uri(path.as_str())).await
        });
        prop_assert_eq!(status, StatusCode::OK, "{}", path);
        prop_assert_eq!(key, format!("{NS}{{job:7}}"), "{}", path);
    }
}
