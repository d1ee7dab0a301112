//! Lock keys as text: [`LockKey`], [`KeyBuilder`], and the escaping and separator rules that
//! templates and code share.
//!
//! This file knows nothing of HTTP (no `http` import, no module that has one), so that the lock
//! engine ([`Locks`](crate::Locks), the backends, leases) can name keys without depending on the
//! request side: key templates and extractors build on it, never the other way round.

use std::fmt;
use std::ops::Range;

use super::error::TemplateError;

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

    /// An empty key, to be built with [`LockKey::push_literal`] and
    /// [`LockKey::push_material_escaping`] (by templates and [`KeyBuilder`], which check the
    /// separator rule first).
    pub(crate) fn empty() -> Self {
        Self(String::new())
    }

    /// Appends developer-written text (a template's literal part): escaped like material, except
    /// that `:` is kept, so `account:` stays readable.
    pub(crate) fn push_literal(&mut self, text: &str) {
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

    /// Appends user-controlled material, escaped, with no separator, escaping also every ASCII
    /// byte in `extra` (a bit per byte value): the separators of a key template.
    ///
    /// Only escaped separators keep material apart: with `-` between two values and `-` not in
    /// `extra`, `("1-2", "3")` and `("1", "2-3")` would give one key. Callers check the
    /// separator rule ([`separators`]) and pass its answer as `extra`.
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
/// lock as a [key template](super::KeyTemplate) does for a request.
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
    /// Fails, as [`KeyTemplate::parse`](super::KeyTemplate::parse) fails for the equivalent template, when two parts have
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
                    shapes.push(Piece::Literal { text: literal, at });
                }
                KeyPiece::Part(_) => {
                    values += 1;
                    text.push_str(&format!("{{part{values}}}"));
                    shapes.push(Piece::Value {
                        span: at..text.len(),
                    });
                }
            }
        }
        let escape = separators(&text, &shapes)?;
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
    let plain = |byte: u8| kept_plain(byte) && (byte >= 128 || extra & (1u128 << byte) == 0);
    out.reserve(material.len());
    let mut rest = material;
    while !rest.is_empty() {
        // Runs of plain bytes (most keys are one) are copied whole.
        let (run, tail) = rest.split_at(rest.iter().position(|&b| !plain(b)).unwrap_or(rest.len()));
        match std::str::from_utf8(run) {
            Ok(run) => out.push_str(run),
            // Unreachable (plain bytes are ASCII), but never worth a panic.
            Err(_) => out.extend(run.iter().map(|&b| char::from(b))),
        }
        let Some((&byte, tail)) = tail.split_first() else {
            break;
        };
        out.push('%');
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
        rest = tail;
    }
}

/// Checks that every literal between two placeholders separates them, and returns the set of
/// separator characters that material must escape.
///
/// Why this makes keys injective: material never contains a separator character unescaped (nor
/// does an escape `%XX`, whose `%` and hex digits are not separator characters), and every
/// separating literal has at least one of them, kept plain in the key. So, reading the key from
/// the left, the first separator character after a placeholder's value is at a fixed offset in
/// the next separator: where each value ends is determined by the key, and percent-escaping is
/// injective, so the values are too.
pub(crate) fn separators(text: &str, parts: &[Piece]) -> Result<u128, TemplateError> {
    let mut escape = 0u128;
    for (index, part) in parts.iter().enumerate() {
        let (Some(Piece::Value { span: before }), Some(Piece::Value { span })) = (
            index.checked_sub(1).and_then(|i| parts.get(i)),
            parts.get(index + 1),
        ) else {
            // Leading and trailing literals are fixed text: they need nothing.
            if let (Piece::Value { span: first }, Some(Piece::Value { span })) =
                (part, parts.get(index + 1))
            {
                return Err(TemplateError {
                    template: text.into(),
                    position: span.start,
                    expected: "a separator such as `:` between two placeholders".into(),
                    found: format!(
                        "`{}` right after `{}`",
                        &text[span.clone()],
                        &text[first.clone()]
                    ),
                });
            }
            continue;
        };
        let Piece::Literal { text: literal, at } = part else {
            // Three placeholders in a row: refused above, at the first pair.
            continue;
        };
        let mut found = false;
        for byte in literal.bytes() {
            if (byte == b':' || kept_plain(byte)) && !byte.is_ascii_alphanumeric() {
                escape |= 1u128 << byte;
                found = true;
            }
        }
        if !found {
            return Err(TemplateError {
                template: text.into(),
                position: *at,
                expected: "a separator with a punctuation character that is kept in the key, \
                           such as `:`, `-` or `/` (letters, digits, spaces, `%`, `#` and \
                           braces cannot separate two values)"
                    .into(),
                found: format!(
                    "`{}` between `{}` and `{}`",
                    &text[before.end..span.start],
                    &text[before.clone()],
                    &text[span.clone()]
                ),
            });
        }
    }
    Ok(escape)
}

/// A part of a key as the separator rule sees it: fixed text, or a value (its placeholder's
/// byte range in the template text). Templates and [`KeyBuilder`] both
/// describe themselves this way, so both follow one rule.
pub(crate) enum Piece<'a> {
    Literal { text: &'a str, at: usize },
    Value { span: Range<usize> },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time rule that `escape_with` implements run by run.
    fn escaped_byte_by_byte(material: &[u8], extra: u128) -> String {
        material
            .iter()
            .map(|&byte| {
                if kept_plain(byte) && (byte >= 128 || extra & (1u128 << byte) == 0) {
                    char::from(byte).to_string()
                } else {
                    format!("%{byte:02X}")
                }
            })
            .collect()
    }

    #[test]
    fn escaping_copies_plain_runs_and_escapes_exactly_the_other_bytes() {
        let every_byte: Vec<u8> = (0..=255).collect();
        let samples: [&[u8]; 7] = [
            b"",
            b"account-42",
            b"a:b{c}#d%e",
            b"%%",
            b" leading and trailing ",
            "caf\u{e9} \u{1F512}".as_bytes(),
            &every_byte,
        ];
        let extras = [0u128, 1 << b'-', (1 << b'-') | (1 << b'.') | (1 << b'a')];
        for material in samples {
            for extra in extras {
                let mut out = String::from("prefix:");
                escape_with(&mut out, material, extra);
                let expected = format!("prefix:{}", escaped_byte_by_byte(material, extra));
                assert_eq!(out, expected, "{material:?} with {extra:#x}");
            }
        }
    }

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
        let key = LockKey::literal("account:{x}:")
            .part("a:b")
            .build()
            .unwrap();
        assert_eq!(key.as_str(), "account:%7Bx%7D:a%3Ab");
    }

    #[test]
    fn join_appends_an_escaped_part() {
        let key = LockKey::new("tenant").join(&LockKey::new("a:b"));
        assert_eq!(key.as_str(), "tenant:a%3Ab");
    }

    #[test]
    fn a_builder_escapes_its_separators_in_values() {
        let key = LockKey::builder()
            .part("1-2")
            .literal("-")
            .part("3")
            .build()
            .unwrap();
        assert_eq!(key.as_str(), "1%2D2-3");
        let other = LockKey::builder()
            .part("1")
            .literal("-")
            .part("2-3")
            .build()
            .unwrap();
        assert_ne!(key, other);
    }
}
