//! Lock keys: what a request is locked on, and how it is extracted.
//!
//! A [`KeyExtractor`] looks at a request's head (method, URI, headers, extensions) and answers:
//!
//! - `Ok(Some(key))`: lock on `key` before calling the inner service;
//! - `Ok(None)`: this request needs no lock, call the inner service directly;
//! - `Err(rejection)`: the request cannot be keyed: answer **400** with a problem+json body when
//!   the request lacks or garbles a part the key needs, and **500** when no request could be
//!   keyed because the server is wired wrong (see [`KeyRejectionKind`]).
//!
//! Closures with the right signature are extractors, and the built-ins in this module cover the
//! usual sources: [`Header`], [`Query`], [`PathParam`], [`PathSegment`] and [`Global`], combined
//! with [`KeyExtractorExt::and`].
//!
//! # Key hygiene
//!
//! User-controlled material (a header value, a query parameter) goes through [`LockKey::new`],
//! which percent-escapes every byte that is not printable ASCII and every byte that has a meaning
//! in our key layout (`%`, `:`, `{`, `}`, `#`). So material is binary-safe, parts joined with `:`
//! never run into each other, and braces in user input can never choose a Redis Cluster hash
//! slot. A [key template](KeyTemplate) also escapes, in its values, every character its
//! separators are made of, and refuses placeholders with no separator between them, so within
//! one template two different tuples of values never produce the same key. Query values are
//! decoded to bytes (`%FE` and `%FF` stay different), and a key parameter given twice is a 400.
//!
//! The layer adds the namespace (default `tower-lock:`) and the key as a Redis Cluster hash tag
//! (`tower-lock:{account:42}`), names the empty key by a marker no material can produce (so its
//! hash tag is not empty and its fencing counter stays in its slot), and replaces keys longer
//! than its bound (default 256 bytes) with a SHA-256 digest.
//!
//! Keys of different extractors can meet: `Header::new("x-id")` and `PathParam::new("id")` both
//! give `42`. In one namespace, give each route's key a prefix of its own (`account:{path.id}`).
//!
//! ```
//! use tower_lock::key::{KeyExtractor, KeyExtractorExt, Header, PathSegment, LockKey};
//!
//! let extractor = Header::new("x-tenant-id").and(PathSegment::new(1));
//! let req = http::Request::post("/accounts/42/deposit")
//!     .header("x-tenant-id", "acme")
//!     .body(())
//!     .unwrap();
//! let (parts, _) = req.into_parts();
//! let key = extractor.extract(&parts).unwrap().unwrap();
//! assert_eq!(key.as_str(), "acme:42");
//! ```

mod error;
mod extractor;
pub(crate) mod lock_key;
pub(crate) mod normalize;
pub(crate) mod pattern;
mod rejection;
mod sources;
mod template;

pub use error::TemplateError;
pub(crate) use extractor::DynExtract;
pub use extractor::{And, KeyExtractor, KeyExtractorExt};
pub use lock_key::{KeyBuilder, LockKey};
pub(crate) use rejection::ReportOnce;
pub use rejection::{KeyRejection, KeyRejectionKind};
pub use sources::{Global, Header, PathParam, PathSegment, Query};
pub use template::KeyTemplate;
