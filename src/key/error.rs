//! [`TemplateError`]: a key template (or a [`KeyBuilder`](super::KeyBuilder)) that breaks the
//! key rules. Free of HTTP, like [`lock_key`](super::lock_key), which reports it.

use std::fmt;

/// A malformed key template: where it went wrong and what was expected there.
///
/// This is a configuration error, reported while the service is built:
///
/// ```
/// use tower_lock::key::KeyTemplate;
///
/// let error = KeyTemplate::parse("acc:{pth.id}").unwrap_err();
/// assert_eq!(
///     error.to_string(),
///     "key template `acc:{pth.id}`: at byte 4: expected one of `path.NAME`, `header.NAME`, \
///      `query.NAME`, `method`, `matched_path`, found `pth.id`"
/// );
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateError {
    pub(super) template: Box<str>,
    pub(super) position: usize,
    pub(super) expected: String,
    pub(super) found: String,
}

impl TemplateError {
    /// Byte offset in the template text where the error was found.
    pub fn position(&self) -> usize {
        self.position
    }

    /// What was expected at [`position`](Self::position), e.g. ``a valid HTTP header name``.
    pub fn expected(&self) -> &str {
        &self.expected
    }

    /// What was found instead, e.g. ``a lone `}` ``.
    pub fn found(&self) -> &str {
        &self.found
    }

    /// The template text.
    pub fn template(&self) -> &str {
        &self.template
    }
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "key template `{}`: at byte {}: expected {}, found {}",
            self.template, self.position, self.expected, self.found
        )
    }
}

impl std::error::Error for TemplateError {}
