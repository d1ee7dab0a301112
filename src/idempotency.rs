//! The `Idempotency-Key` preset, after the IETF httpapi draft "The Idempotency-Key HTTP Header
//! Field".
//!
//! - The lock key is `idempotency:` + the `Idempotency-Key` header (escaped), optionally scoped
//!   by who is calling ([`IdempotencyKey::scoped_by`]: `idempotency:` + identity + `:` + key), so
//!   two users' keys never collide. Every key of the preset starts with `idempotency:`, so it is
//!   never the lock of another route of the same namespace unless that route's key starts with
//!   `idempotency:` too: `Idempotency-Key: 42` is not the lock of `account:{path.id}` or of
//!   `{path.id}` for id 42, which can never start so (escaped request material has no `:`), but
//!   a template that joins two request values with `:`, like `{header.a}:{header.b}`, can.
//! - A protected method (`POST` and `PATCH` by default, the draft's non-idempotent methods)
//!   without the header, or with an empty one (`Idempotency-Key:` or `Idempotency-Key: ""`):
//!   **400** problem+json, title "Idempotency-Key is missing".
//! - The value is parsed as the draft defines it, a Structured Field **String** (RFC 9651, with
//!   the [`sfv`](https://docs.rs/sfv) crate): `Idempotency-Key: "8e03978e-40d5"` keys on
//!   `8e03978e-40d5` (escapes undone, parameters ignored). Many clients send the key **bare**
//!   (`Idempotency-Key: 8e03978e-40d5`, not a valid sf-string), so a bare value of visible ASCII
//!   without `"`, `,`, `\` or spaces is taken as it is, and is the same key as its quoted form
//!   (the same lock: never less locking than either reading). Anything else — the header given
//!   twice or as a list (`"a", "b"`), a malformed string (`"abc`), spaces, control characters or
//!   bytes outside ASCII — is a **400** (which key would the handler act on?). Long keys are
//!   fine: a lock key over `max_key_len` becomes a digest.
//! - A retry while the first request with the same key is still being processed: **409**
//!   problem+json, title "A request is outstanding for this Idempotency-Key".
//! - Other methods pass through unlocked. As a [policy], the preset covers only its
//!   methods, so in a [`LockRoutes`](crate::LockRoutes) table a `DELETE` on the same path goes on
//!   to a later route.
//!
//! **Not in scope:** response replay. The lock only guarantees that two requests with the same key
//! are never processed at the same time; remembering the first response and replaying it to later
//! retries (and answering 422 to a reused key with another payload) is your handler's job.
//!
//! Idempotency keys are unbounded in number, so the preset turns fencing off (no counter key per
//! idempotency key is left in Redis); the lock itself is deleted when the request ends.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_lock::{MemoryBackend, idempotency};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(idempotency::layer(MemoryBackend::new()))
//!     .service_fn(|_req: Request<()>| async { Ok::<_, Infallible>(Response::new(String::new())) });
//!
//! let missing = Request::post("/orders").body(()).unwrap();
//! assert_eq!(service.clone().oneshot(missing).await.unwrap().status(), StatusCode::BAD_REQUEST);
//!
//! let keyed = Request::post("/orders").header("idempotency-key", "\"8e03978e\"").body(()).unwrap();
//! assert_eq!(service.oneshot(keyed).await.unwrap().status(), StatusCode::OK);
//! # }
//! ```

use std::sync::Arc;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, Method, Response, StatusCode};

use crate::backend::LockBackend;
use crate::key::{DynExtract, KeyExtractor, KeyRejection, KeyRejectionKind, LockKey};
use crate::layer::LockLayer;
use crate::policy::{LockPolicy, covers};
use crate::response::{Rejection, problem_response};

/// The header name, `idempotency-key`.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The detail of the 400 for a protected request without the header (the draft's wording).
///
/// [`rejection_response`] recognises that 400 by what it is ([`is_missing_key`]: a missing
/// `Idempotency-Key` header), never by this text, which any other extractor (a scope extractor,
/// say) could happen to use.
const MISSING_KEY_DETAIL: &str =
    "This operation is idempotent and it requires correct usage of Idempotency Key.";

/// The first part of every key of the preset, which keeps its keys apart from other routes'.
const KEY_PREFIX: &str = "idempotency";

/// The detail of the 400 for a header given more than once.
const TWICE_DETAIL: &str = "Idempotency-Key must be given once.";

/// The detail of the 400 for a value that is neither an sf-string nor a bare key.
const MALFORMED_DETAIL: &str = "Idempotency-Key must be a Structured Field string, such as \
                                \"8e03978e-40d5-43e8\" (a bare key of visible ASCII without \
                                spaces, quotes, commas or backslashes is accepted too).";

/// The preset's 400 for a missing (or empty) key.
fn missing_key() -> KeyRejection {
    KeyRejection::missing_header(IDEMPOTENCY_KEY.clone()).with_detail(MISSING_KEY_DETAIL)
}

/// The key in a request's `Idempotency-Key` header, read as the preset reads it (see the
/// [module docs](self)): the content of a Structured Field string, or a bare key as it is. A
/// handler that stores and replays responses by key must use this one, so that it agrees with
/// the lock (`"8e03978e"` and `8e03978e` are one key). The error is the preset's 400.
///
/// ```
/// use http::HeaderMap;
/// use tower_lock::idempotency::key_in;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("idempotency-key", "\"8e03978e\"".parse().unwrap());
/// assert_eq!(key_in(&headers).unwrap(), "8e03978e");
/// headers.insert("idempotency-key", "8e03978e".parse().unwrap());
/// assert_eq!(key_in(&headers).unwrap(), "8e03978e");
/// headers.insert("idempotency-key", "\"\"".parse().unwrap());
/// assert!(key_in(&headers).is_err());
/// ```
pub fn key_in(headers: &http::HeaderMap) -> Result<String, KeyRejection> {
    // Only ASCII comes out of `read_key` (sf-strings and bare keys are ASCII).
    String::from_utf8(read_key(headers)?).map_err(|_| KeyRejection::new(MALFORMED_DETAIL))
}

/// The key of `headers`' one `Idempotency-Key` value.
fn read_key(headers: &http::HeaderMap) -> Result<Vec<u8>, KeyRejection> {
    let mut values = headers.get_all(&IDEMPOTENCY_KEY).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err(if headers.contains_key(&IDEMPOTENCY_KEY) {
            KeyRejection::new(TWICE_DETAIL)
        } else {
            missing_key()
        });
    };
    parse_key(value.as_bytes())
}

/// The key in an `Idempotency-Key` value (see the [module docs](self)): the content of an
/// sf-string, or a bare value as it is.
fn parse_key(value: &[u8]) -> Result<Vec<u8>, KeyRejection> {
    // HTTP trims surrounding whitespace already; a parser fed directly may not have.
    let value = value.trim_ascii();
    if value.is_empty() {
        return Err(missing_key());
    }
    if value.first() == Some(&b'"') {
        let item = sfv::Parser::new(value)
            .parse::<sfv::Item>()
            .map_err(|_| KeyRejection::new(MALFORMED_DETAIL))?;
        return match item.bare_item.as_string() {
            Some(string) if string.as_str().is_empty() => Err(missing_key()),
            Some(string) => Ok(string.as_str().as_bytes().to_vec()),
            None => Err(KeyRejection::new(MALFORMED_DETAIL)),
        };
    }
    let bare = |b: &u8| b.is_ascii_graphic() && !matches!(b, b'"' | b',' | b'\\');
    if value.iter().all(bare) {
        Ok(value.to_vec())
    } else {
        Err(KeyRejection::new(MALFORMED_DETAIL))
    }
}

/// Keys requests by their `Idempotency-Key` header. See the [module docs](self).
#[derive(Clone)]
pub struct IdempotencyKey {
    methods: Arc<[Method]>,
    scope: Option<Arc<DynExtract>>,
}

impl Default for IdempotencyKey {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyKey")
            .field("methods", &self.methods)
            .field("scoped", &self.scope.is_some())
            .finish()
    }
}

impl IdempotencyKey {
    /// Requires the header on `POST` and `PATCH`.
    pub fn new() -> Self {
        Self {
            methods: Arc::new([Method::POST, Method::PATCH]),
            scope: None,
        }
    }

    /// Requires the header on these methods instead (`GET` covers `HEAD` too, as in
    /// [`LockPolicy::methods`]).
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// Scopes keys by the caller's identity (a user id from a header, an API key, an extension
    /// your authentication layer inserted): the lock key becomes
    /// `idempotency:identity:idempotency-key`. The header value is escaped (it never contains `:`),
    /// so the identity is everything between the first and the last `:`. If
    /// the scope extractor finds no identity, the request is rejected (400), because an unscoped
    /// key could collide with another caller's.
    pub fn scoped_by<K: KeyExtractor>(mut self, scope: K) -> Self {
        self.scope = Some(Arc::new(move |parts: &Parts| scope.extract(parts)));
        self
    }
}

impl KeyExtractor for IdempotencyKey {
    fn extract(&self, parts: &Parts) -> Result<Option<LockKey>, KeyRejection> {
        if !covers(&self.methods, &parts.method) {
            return Ok(None);
        }
        let key = LockKey::new(read_key(&parts.headers)?);
        let prefix = LockKey::new(KEY_PREFIX);
        match &self.scope {
            None => Ok(Some(prefix.join(&key))),
            Some(scope) => match scope(parts)? {
                Some(identity) => Ok(Some(prefix.join(&identity).join(&key))),
                None => Err(KeyRejection::new(
                    "The caller's identity, which scopes the Idempotency-Key, is missing.",
                )),
            },
        }
    }
}

/// The draft's problem responses for a missing `Idempotency-Key` (400) and outstanding requests
/// (409); every other rejection (a missing caller identity, a backend failure) keeps its default
/// response.
pub fn rejection_response(rejection: Rejection) -> Response<Bytes> {
    match &rejection {
        Rejection::Conflict { .. } => {
            let mut response = problem_response(
                StatusCode::CONFLICT,
                "urn:tower-lock:idempotency-key-outstanding",
                "A request is outstanding for this Idempotency-Key",
                "A request with the same Idempotency-Key is still being processed; retry after \
                 it completes.",
                None,
            );
            // Keep the Retry-After computed from the holder's lease.
            if let Some(secs) = rejection.retry_after_secs() {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, secs.into());
            }
            response
        }
        Rejection::InvalidKey(invalid) if is_missing_key(invalid) => problem_response(
            StatusCode::BAD_REQUEST,
            "urn:tower-lock:idempotency-key-missing",
            "Idempotency-Key is missing",
            MISSING_KEY_DETAIL,
            None,
        ),
        _ => rejection.into_response(),
    }
}

/// Whether `rejection` says that the `Idempotency-Key` header is missing: by its kind and the
/// header it records, never by its text. (So a layer keyed by `Header::new("idempotency-key")`
/// answered by [`rejection_response`] gets the draft's 400 too.)
fn is_missing_key(rejection: &KeyRejection) -> bool {
    rejection.kind() == KeyRejectionKind::Missing && rejection.header() == Some(&IDEMPOTENCY_KEY)
}

/// The preset as a policy (for [`LockRoutes`](crate::LockRoutes) or `route_layer`).
///
/// The policy covers the key's methods (`POST` and `PATCH` by default) and no others, so in a
/// route table other methods on the same path go on to later routes.
///
/// This is where the preset's settings live; [`layer`] and [`layer_with`] apply them too.
pub fn policy(key: IdempotencyKey) -> LockPolicy {
    let methods = key.methods.to_vec();
    LockPolicy::key(key)
        .methods(methods)
        .fencing(false)
        .on_rejection(rejection_response)
}

/// The preset as a layer: `Idempotency-Key` on `POST`/`PATCH`, unscoped.
pub fn layer<B: LockBackend>(backend: B) -> LockLayer<IdempotencyKey, B> {
    layer_with(backend, IdempotencyKey::new())
}

/// The preset as a layer, with a configured [`IdempotencyKey`] (scope, methods).
pub fn layer_with<B: LockBackend>(backend: B, key: IdempotencyKey) -> LockLayer<IdempotencyKey, B> {
    // The policy's settings over a layer keyed by `key` itself (which covers its own methods),
    // so that the layer keeps its `IdempotencyKey` type.
    policy(key.clone()).apply(LockLayer::new(backend, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Header;

    fn parts(method: Method, headers: &[(&str, &str)]) -> Parts {
        let mut builder = http::Request::builder().method(method).uri("/orders");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn scoped_keys_of_two_callers_never_collide() {
        let key = IdempotencyKey::new().scoped_by(Header::new("x-user"));
        let alice = key
            .extract(&parts(
                Method::POST,
                &[("x-user", "alice"), ("idempotency-key", "k")],
            ))
            .unwrap()
            .unwrap();
        let bob = key
            .extract(&parts(
                Method::POST,
                &[("x-user", "bob"), ("idempotency-key", "k")],
            ))
            .unwrap()
            .unwrap();
        assert_ne!(alice, bob);
        assert!(
            key.extract(&parts(Method::POST, &[("idempotency-key", "k")]))
                .is_err()
        );
    }

    #[test]
    fn unprotected_methods_pass_through_and_protected_ones_need_the_header() {
        let key = IdempotencyKey::new();
        assert_eq!(key.extract(&parts(Method::GET, &[])).unwrap(), None);
        assert!(key.extract(&parts(Method::PATCH, &[])).is_err());
    }

    #[test]
    fn missing_scope_is_not_reported_as_a_missing_key() {
        let key = IdempotencyKey::new().scoped_by(Header::new("x-user"));
        let rejection = key
            .extract(&parts(Method::POST, &[("idempotency-key", "k")]))
            .unwrap_err();
        let response = rejection_response(Rejection::from(rejection));
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_ne!(body["title"], "Idempotency-Key is missing");
        assert!(body["detail"].as_str().unwrap().contains("x-user"));
    }

    #[test]
    fn a_key_required_on_get_is_required_on_head() {
        let key = IdempotencyKey::new().methods([Method::GET]);
        assert!(key.extract(&parts(Method::HEAD, &[])).is_err());
        assert_eq!(key.extract(&parts(Method::POST, &[])).unwrap(), None);
    }

    #[test]
    fn keys_carry_the_idempotency_prefix() {
        let unscoped = IdempotencyKey::new()
            .extract(&parts(Method::POST, &[("idempotency-key", "42")]))
            .unwrap()
            .unwrap();
        assert_eq!(unscoped.as_str(), "idempotency:42");
        let scoped = IdempotencyKey::new()
            .scoped_by(Header::new("x-user"))
            .extract(&parts(
                Method::POST,
                &[("x-user", "alice"), ("idempotency-key", "a:b")],
            ))
            .unwrap()
            .unwrap();
        // The header value is escaped, so the last `:` ends the identity.
        assert_eq!(scoped.as_str(), "idempotency:alice:a%3Ab");
    }

    fn title(rejection: KeyRejection) -> serde_json::Value {
        let response = rejection_response(Rejection::from(rejection));
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        body["title"].clone()
    }

    #[test]
    fn a_lookalike_rejection_does_not_get_the_missing_key_title() {
        // Scope extractors whose own rejections have the very text of the preset's 400 (a
        // literal, which the compiler may even merge with the preset's own), of every kind.
        const TEXT: &str =
            "This operation is idempotent and it requires correct usage of Idempotency Key.";
        assert_eq!(TEXT, MISSING_KEY_DETAIL);
        let lookalikes = [
            KeyRejection::new(TEXT),
            KeyRejection::missing("header `x-user`").with_detail(TEXT),
            KeyRejection::misconfigured(TEXT),
            KeyRejection::missing_header(HeaderName::from_static("x-user")).with_detail(TEXT),
        ];
        for lookalike in lookalikes {
            let scope = move |_: &Parts| -> Result<Option<LockKey>, KeyRejection> {
                Err(lookalike.clone())
            };
            let key = IdempotencyKey::new().scoped_by(scope);
            let rejection = key
                .extract(&parts(Method::POST, &[("idempotency-key", "k")]))
                .unwrap_err();
            assert_eq!(rejection.detail(), TEXT);
            assert_ne!(title(rejection), "Idempotency-Key is missing");

            // The preset's own rejection still gets it.
            let rejection = key.extract(&parts(Method::POST, &[])).unwrap_err();
            assert_eq!(title(rejection), "Idempotency-Key is missing");
        }
    }

    #[test]
    fn a_missing_idempotency_key_header_is_recognised_whoever_reports_it() {
        let rejection = Header::new("Idempotency-Key")
            .extract(&parts(Method::POST, &[]))
            .unwrap_err();
        assert_eq!(title(rejection), "Idempotency-Key is missing");
        let rejection = IdempotencyKey::new()
            .extract(&parts(Method::PATCH, &[]))
            .unwrap_err();
        assert_eq!(rejection.kind(), KeyRejectionKind::Missing);
        assert_eq!(rejection.header(), Some(&IDEMPOTENCY_KEY));
        assert_eq!(rejection.detail(), MISSING_KEY_DETAIL);
    }

    /// The preset as a layer and as a policy's layer: the same 400, and no fencing.
    #[tokio::test]
    async fn the_layer_and_the_policy_are_one_preset() {
        use crate::{LockLease, MemoryBackend};
        use http_body_util::BodyExt;
        use tower::{ServiceBuilder, ServiceExt};

        async fn check<K: KeyExtractor>(layer: LockLayer<K, MemoryBackend>) {
            let service = ServiceBuilder::new().layer(layer).service_fn(
                |request: http::Request<()>| async move {
                    let lease = request.extensions().get::<LockLease>();
                    let token = lease.map(LockLease::fencing_token);
                    Ok::<_, std::convert::Infallible>(Response::new(format!("{token:?}")))
                },
            );
            let call = |request| async {
                let response = service.clone().oneshot(request).await.unwrap();
                let status = response.status();
                let body = response.into_body().collect().await.unwrap().to_bytes();
                (status, String::from_utf8(body.to_vec()).unwrap())
            };

            let (status, body) = call(http::Request::post("/orders").body(()).unwrap()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let problem: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(problem["title"], "Idempotency-Key is missing");

            let keyed = http::Request::post("/orders").header("idempotency-key", "k");
            let (status, body) = call(keyed.body(()).unwrap()).await;
            // Locked, with fencing off.
            assert_eq!((status, &*body), (StatusCode::OK, "Some(0)"));
        }

        check(layer(MemoryBackend::new())).await;
        check(policy(IdempotencyKey::new()).layer(MemoryBackend::new())).await;
    }

    fn key_of(values: &[&[u8]]) -> Result<String, KeyRejection> {
        let mut request = http::Request::post("/orders");
        for value in values {
            request = request.header(
                "idempotency-key",
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        let parts = request.body(()).unwrap().into_parts().0;
        IdempotencyKey::new()
            .extract(&parts)
            .map(|key| key.unwrap().as_str().to_owned())
    }

    #[test]
    fn a_quoted_key_is_an_sf_string_and_a_bare_key_is_the_same_key() {
        assert_eq!(key_of(&[b"\"8e03978e\""]).unwrap(), "idempotency:8e03978e");
        assert_eq!(key_of(&[b"8e03978e"]).unwrap(), "idempotency:8e03978e");
        // Escapes are undone, parameters ignored.
        assert_eq!(key_of(&[br#""a\"b""#]).unwrap(), "idempotency:a\"b");
        assert_eq!(key_of(&[b"\"k\";v=1"]).unwrap(), "idempotency:k");
        // Digits first (not an sf-token) and `:`/`/` are fine bare.
        assert_eq!(key_of(&[b"42"]).unwrap(), "idempotency:42");
        // Other Structured Field items are taken bare, as they are (`?1` is an sf-boolean).
        assert_eq!(key_of(&[b"?1"]).unwrap(), "idempotency:?1");
    }

    #[test]
    fn an_empty_key_is_a_missing_key() {
        for empty in [&b""[..], b"\"\"", b"   "] {
            let rejection = key_of(&[empty]).unwrap_err();
            assert_eq!(rejection.kind(), KeyRejectionKind::Missing, "{empty:?}");
            assert_eq!(title(rejection), "Idempotency-Key is missing");
        }
    }

    #[test]
    fn a_key_given_twice_or_as_a_list_is_refused() {
        let twice = key_of(&[b"\"a\"", b"\"a\""]).unwrap_err();
        assert_eq!(twice.kind(), KeyRejectionKind::Invalid);
        assert_eq!(twice.detail(), TWICE_DETAIL);
        for list in [&b"\"a\", \"b\""[..], b"a, b", b"a,b"] {
            let rejection = key_of(&[list]).unwrap_err();
            assert_eq!(rejection.kind(), KeyRejectionKind::Invalid, "{list:?}");
        }
    }

    #[test]
    fn malformed_keys_are_refused() {
        for bad in [
            &b"\"unterminated"[..],
            b"\"a\" trailing",
            b"\"\xc3\xa9\"",
            b"with space",
            b"\xff\xfe",
            b"tab\there",
            b"back\\slash",
            b"quote\"d",
        ] {
            let rejection = key_of(&[bad]).unwrap_err();
            assert_eq!(rejection.kind(), KeyRejectionKind::Invalid, "{bad:?}");
            assert_eq!(rejection.detail(), MALFORMED_DETAIL);
        }
    }

    #[test]
    fn outstanding_request_gets_the_drafts_title() {
        let response = rejection_response(Rejection::Conflict {
            remaining: Some(std::time::Duration::from_millis(1500)),
            retry_after: None,
        });
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(response.headers()[http::header::RETRY_AFTER], "2");
        let body: serde_json::Value = serde_json::from_slice(response.body()).unwrap();
        assert_eq!(
            body["title"],
            "A request is outstanding for this Idempotency-Key"
        );
    }
}
