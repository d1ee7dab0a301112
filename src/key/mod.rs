//! Lock keys: what a request is locked on, and how it is extracted.
//!
//! A [`KeyExtractor`] looks at a request's head (method, URI, headers, extensions) and answers:
//!
//! - `Ok(Some(key))`: lock on `key` before calling the inner service;
//! - `Ok(None)`: this request needs no lock, call the inner service directly;
//! - `Err(rejection)`: the request cannot be keyed, answer **400** with a problem+json body.
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

pub(crate) mod pattern;
mod sources;
mod template;

use std::borrow::Cow;
use std::fmt;

pub use sources::{And, Global, Header, PathParam, PathSegment, Query};
pub use template::{KeyTemplate, TemplateError};

/// Extracts the lock key from a request's head.
///
/// Implemented by the built-ins of this module and by every closure
/// `Fn(&http::request::Parts) -> Result<Option<LockKey>, KeyRejection>`.
///
/// ```
/// use tower_lock::key::{KeyExtractor, KeyRejection, LockKey};
///
/// // Lock on the job id of `/jobs/{id}`, but only for `PUT`.
/// let jobs = |parts: &http::request::Parts| -> Result<Option<LockKey>, KeyRejection> {
///     if parts.method != http::Method::PUT {
///         return Ok(None);
///     }
///     match parts.uri.path().strip_prefix("/jobs/") {
///         Some(id) if !id.is_empty() => Ok(Some(LockKey::new(id))),
///         _ => Err(KeyRejection::new("the path has no job id")),
///     }
/// };
/// let (parts, _) = http::Request::put("/jobs/7").body(()).unwrap().into_parts();
/// assert_eq!(jobs.extract(&parts).unwrap().unwrap().as_str(), "7");
/// ```
pub trait KeyExtractor: Clone + Send + Sync + 'static {
    /// Returns the key to lock on, `None` for no lock, or a rejection (answered with 400).
    fn extract(&self, parts: &http::request::Parts) -> Result<Option<LockKey>, KeyRejection>;
}

impl<F> KeyExtractor for F
where
    F: Fn(&http::request::Parts) -> Result<Option<LockKey>, KeyRejection>
        + Clone
        + Send
        + Sync
        + 'static,
{
    fn extract(&self, parts: &http::request::Parts) -> Result<Option<LockKey>, KeyRejection> {
        self(parts)
    }
}

/// Combinators for every [`KeyExtractor`].
pub trait KeyExtractorExt: KeyExtractor + Sized {
    /// Locks on both keys joined with `:`; if either gives no key, the request is not locked.
    fn and<O: KeyExtractor>(self, other: O) -> And<Self, O> {
        And::new(self, other)
    }
}

impl<K: KeyExtractor> KeyExtractorExt for K {}

/// A lock key: escaped user material, joined from one or more parts.
///
/// The text of a key never contains `{`, `}`, `#`, control bytes or non-ASCII bytes: they are
/// percent-escaped by [`LockKey::new`]. Parts are joined with `:`, which is escaped inside parts,
/// so `("a:b", "c")` and `("a", "b:c")` are different keys.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct LockKey(String);

impl LockKey {
    /// A key from user-controlled material (any bytes), escaped as described above.
    pub fn new(material: impl AsRef<[u8]>) -> Self {
        let material = material.as_ref();
        let mut text = String::with_capacity(material.len());
        escape_into(&mut text, material);
        Self(text)
    }

    /// Appends another part, separated by `:`.
    pub fn join(mut self, other: &LockKey) -> Self {
        self.0.reserve(other.0.len() + 1);
        self.0.push(':');
        self.0.push_str(&other.0);
        self
    }

    /// Appends escaped user material as another part, separated by `:`.
    pub fn push(&mut self, material: impl AsRef<[u8]>) {
        self.0.push(':');
        escape_into(&mut self.0, material.as_ref());
    }

    /// An empty key, to be built with [`LockKey::push_literal`] and [`LockKey::push_material`].
    pub fn empty() -> Self {
        Self(String::new())
    }

    /// Appends developer-written text (a template's literal part): escaped like material, except
    /// that `:` is kept, so `account:` stays readable.
    pub fn push_literal(&mut self, text: &str) {
        for part in text.split_inclusive(':') {
            match part.strip_suffix(':') {
                Some(part) => {
                    escape_into(&mut self.0, part.as_bytes());
                    self.0.push(':');
                }
                None => escape_into(&mut self.0, part.as_bytes()),
            }
        }
    }

    /// Appends user-controlled material, escaped, with no separator.
    ///
    /// Only `:` separates material unambiguously: after `push_literal("-")` between two
    /// materials, `("1-2", "3")` and `("1", "2-3")` give one key. Key templates escape every
    /// character their separators use, and refuse placeholders without a separator.
    pub fn push_material(&mut self, material: impl AsRef<[u8]>) {
        escape_into(&mut self.0, material.as_ref());
    }

    /// Appends user-controlled material, escaping also every ASCII byte in `extra` (a bit per
    /// byte value): the separators of a key template.
    pub(crate) fn push_material_escaping(&mut self, material: &[u8], extra: u128) {
        escape_with(&mut self.0, material, extra);
    }

    /// The escaped text of the key (without namespace).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Length of the escaped key in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the key is empty (an empty header value, say). Empty keys are valid.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl LockKey {
    /// A [`KeyBuilder`] with nothing in it yet: build a key from code, named exactly as a key
    /// template names it.
    pub fn builder() -> KeyBuilder {
        KeyBuilder::default()
    }

    /// A [`KeyBuilder`] that starts with the literal `text`:
    /// `LockKey::literal("account:").part(id)` is the key the template `account:{path.id}` gives
    /// for a request whose `id` is `id`.
    ///
    /// ```
    /// use tower_lock::key::LockKey;
    ///
    /// let key = LockKey::literal("account:").part("42").build()?;
    /// assert_eq!(key.as_str(), "account:42");
    /// # Ok::<(), tower_lock::key::TemplateError>(())
    /// ```
    pub fn literal(text: &str) -> KeyBuilder {
        KeyBuilder::default().literal(text)
    }
}

/// A lock key built from code (a background job, a CLI, a queue consumer) that names the same
/// lock as a [key template](KeyTemplate) does for a request.
///
/// A [`literal`](Self::literal) is the template's literal text, a [`part`](Self::part) one of its
/// placeholders' values. [`build`](Self::build) renders them with the template's own rules:
/// literal `:` kept and the rest of the literal escaped, values escaped (every separator
/// character included), and two parts with no separator between them refused. So
/// `LockKey::literal("account:").part(id)` and the template `account:{path.id}` give the same key
/// for the same `id`, and a [`Locks`](crate::Locks) engine and a route sharing a namespace take
/// the same lock.
///
/// ```
/// use tower_lock::key::{KeyExtractor, KeyTemplate, LockKey};
///
/// let template = KeyTemplate::parse("{header.x-tenant}-{header.x-doc}")?;
/// let (parts, _) = http::Request::get("/")
///     .header("x-tenant", "a-b")
///     .header("x-doc", "7")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let from_request = template.extract(&parts).unwrap().unwrap();
/// let from_code = LockKey::builder().part("a-b").literal("-").part("7").build()?;
/// assert_eq!(from_code, from_request);
/// assert_eq!(from_code.as_str(), "a%2Db-7");
///
/// // Two values with nothing that separates them are refused, as in a template.
/// assert!(LockKey::builder().part("1").literal("x").part("2").build().is_err());
/// # Ok::<(), tower_lock::key::TemplateError>(())
/// ```
#[derive(Clone, Debug, Default)]
#[must_use = "a key builder does nothing until it is built"]
pub struct KeyBuilder {
    pieces: Vec<KeyPiece>,
}

#[derive(Clone, Debug)]
enum KeyPiece {
    Literal(String),
    Part(Vec<u8>),
}

impl KeyBuilder {
    /// Appends literal text (written by you, like a template's literal text: `account:`).
    /// Successive literals are one literal; an empty one adds nothing.
    pub fn literal(mut self, text: &str) -> Self {
        if text.is_empty() {
            return self;
        }
        match self.pieces.last_mut() {
            Some(KeyPiece::Literal(literal)) => literal.push_str(text),
            _ => self.pieces.push(KeyPiece::Literal(text.to_owned())),
        }
        self
    }

    /// Appends a value (any bytes, such as an id from a queue message): what a template's
    /// placeholder would read from the request.
    pub fn part(mut self, value: impl AsRef<[u8]>) -> Self {
        self.pieces.push(KeyPiece::Part(value.as_ref().to_vec()));
        self
    }

    /// The key, rendered as the equivalent template renders it.
    ///
    /// Fails, as [`KeyTemplate::parse`] fails for the equivalent template, when two parts have
    /// no literal between them, or one without a punctuation character that is kept in the key
    /// (such as `:`, `-`, `/`). The error shows the builder as a template whose parts are
    /// `{part1}`, `{part2}`, …
    pub fn build(&self) -> Result<LockKey, TemplateError> {
        // The equivalent template's text, and where each piece sits in it, for the one
        // separator rule templates follow (and its error messages).
        let mut text = String::new();
        let mut shapes = Vec::with_capacity(self.pieces.len());
        let mut values = 0;
        for piece in &self.pieces {
            let at = text.len();
            match piece {
                KeyPiece::Literal(literal) => {
                    text.push_str(&literal.replace('{', "{{").replace('}', "}}"));
                    shapes.push(template::Piece::Literal { text: literal, at });
                }
                KeyPiece::Part(_) => {
                    values += 1;
                    text.push_str(&format!("{{part{values}}}"));
                    shapes.push(template::Piece::Value {
                        span: at..text.len(),
                    });
                }
            }
        }
        let escape = template::separators(&text, &shapes)?;
        let mut key = LockKey::empty();
        for piece in &self.pieces {
            match piece {
                KeyPiece::Literal(literal) => key.push_literal(literal),
                KeyPiece::Part(value) => key.push_material_escaping(value, escape),
            }
        }
        Ok(key)
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keys are user material: show them only when the user asks for Debug explicitly.
        f.debug_tuple("LockKey").field(&self.0).finish()
    }
}

fn escape_into(out: &mut String, material: &[u8]) {
    escape_with(out, material, 0);
}

/// Whether `byte` is kept as itself in a key's text (everything else is `%XX`), before any
/// template-specific escapes.
pub(crate) fn kept_plain(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'%' | b':' | b'{' | b'}' | b'#')
}

fn escape_with(out: &mut String, material: &[u8], extra: u128) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &byte in material {
        let plain = kept_plain(byte) && (byte >= 128 || extra & (1u128 << byte) == 0);
        if plain {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(byte >> 4)] as char);
            out.push(HEX[usize::from(byte & 0x0f)] as char);
        }
    }
}

/// Why a request could not be keyed; answered with **400** and a problem+json body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyRejection {
    detail: Cow<'static, str>,
}

impl KeyRejection {
    /// A rejection with the given human-readable detail (it is sent to the client).
    pub fn new(detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            detail: detail.into(),
        }
    }

    /// A rejection for a required request part that is missing, e.g. `missing("header `x-id`")`.
    pub fn missing(part: impl fmt::Display) -> Self {
        Self::new(format!(
            "the request has no {part}, which the lock key needs"
        ))
    }

    /// The detail sent to the client.
    pub fn detail(&self) -> &str {
        &self.detail
    }
}

impl fmt::Display for KeyRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for KeyRejection {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_is_injective_over_separators_and_braces() {
        assert_eq!(LockKey::new("a:b").as_str(), "a%3Ab");
        assert_ne!(
            LockKey::new("a:b").join(&LockKey::new("c")),
            LockKey::new("a").join(&LockKey::new("b:c"))
        );
        assert_eq!(LockKey::new("{slot}").as_str(), "%7Bslot%7D");
        assert_eq!(LockKey::new("100%").as_str(), "100%25");
        assert_eq!(LockKey::new("#x").as_str(), "%23x");
    }

    #[test]
    fn binary_material_is_escaped() {
        assert_eq!(LockKey::new([0u8, 255, b' ']).as_str(), "%00%FF%20");
        assert_eq!(LockKey::new("é").as_str(), "%C3%A9");
    }

    #[test]
    fn literals_keep_colons_and_material_does_not() {
        let mut key = LockKey::empty();
        key.push_literal("account:{x}:");
        key.push_material("a:b");
        assert_eq!(key.as_str(), "account:%7Bx%7D:a%3Ab");
    }

    #[test]
    fn push_appends_an_escaped_part() {
        let mut key = LockKey::new("tenant");
        key.push("a:b");
        assert_eq!(key.as_str(), "tenant:a%3Ab");
    }
}
