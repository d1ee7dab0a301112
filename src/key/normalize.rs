//! The path a [`LockRoutes`](crate::LockRoutes) table matches and [`PathSegment`](super::PathSegment)
//! reads: the request's path with its spellings of the same route folded together, so that
//! `/jobs/7/run/`, `//jobs/7/run`, `/jobs/7/./run` and `/jobs/x/../7/run` are locked as
//! `/jobs/7/run` is. The request itself is passed on unchanged.

use std::borrow::Cow;

/// `path` with empty segments (`//`) and `.` segments removed, each `..` segment removing the
/// segment before it (never above the root, as RFC 3986's `remove_dot_segments` does), and a
/// trailing `/` dropped (`/` stays `/`). Case and percent-encoding are left as they are. A path
/// that does not start with `/` (`*`) is left alone.
pub(crate) fn normalize(path: &str) -> Cow<'_, str> {
    if is_normal(path) {
        return Cow::Borrowed(path);
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            segment => segments.push(segment),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in segments {
        normal.push('/');
        normal.push_str(segment);
    }
    if normal.is_empty() {
        normal.push('/');
    }
    Cow::Owned(normal)
}

/// Whether [`normalize`] leaves `path` as it is.
fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return true;
    };
    rest.is_empty()
        || rest
            .split('/')
            .all(|segment| !matches!(segment, "" | "." | ".."))
}

/// Whether `path` carries a percent-encoded `/`, `\` or `.` (`%2F`, `%5C`, `%2E`, either case):
/// a spelling that routers disagree on (axum matches it as part of a segment; servers and
/// proxies that decode before routing see a separator or a dot segment).
pub(crate) fn has_encoded_separators(path: &str) -> bool {
    path.as_bytes()
        .windows(3)
        .any(|w| encoded_separator(w).is_some())
}

/// `path` with `%2F` and `%5C` decoded to `/` and `%2E` to `.`, as a router that decodes them
/// before matching would see it.
pub(crate) fn decode_separators(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(c) = bytes.get(i..i + 3).and_then(encoded_separator) {
            decoded.push(c);
            i += 3;
        } else {
            // Whole characters: `i` only ever moves past whole ones.
            let Some(c) = path.get(i..).and_then(|rest| rest.chars().next()) else {
                break;
            };
            decoded.push(c);
            i += c.len_utf8();
        }
    }
    decoded
}

fn encoded_separator(w: &[u8]) -> Option<char> {
    match w {
        [b'%', b'2', b'f' | b'F'] | [b'%', b'5', b'c' | b'C'] => Some('/'),
        [b'%', b'2', b'e' | b'E'] => Some('.'),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_path_normalize_to_it() {
        for spelling in [
            "/jobs/7/run",
            "/jobs/7/run/",
            "//jobs/7/run",
            "/jobs//7/run",
            "/jobs/7/./run",
            "/jobs/x/../7/run",
            "/./jobs/7/run/.",
            "/../jobs/7/run",
            "/jobs/7/run/x/..",
            "///jobs/7/run//",
        ] {
            assert_eq!(normalize(spelling), "/jobs/7/run", "{spelling}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed_and_case_and_encoding_are_kept() {
        for path in [
            "/",
            "/jobs/7/run",
            "/Jobs/7/RUN",
            "/a/%2e%2e/b",
            "/a/.b/c.",
            "*",
        ] {
            assert!(
                matches!(normalize(path), Cow::Borrowed(p) if p == path),
                "{path}"
            );
        }
        assert_eq!(normalize("/.."), "/");
        assert_eq!(normalize("//"), "/");
        assert_eq!(normalize("/a/.."), "/");
    }

    #[test]
    fn encoded_separators_are_found_and_decoded() {
        assert!(has_encoded_separators("/jobs/7%2Frun"));
        assert!(has_encoded_separators("/jobs/x/%2e%2E/7/run"));
        assert!(has_encoded_separators("/a%5cb"));
        assert!(!has_encoded_separators("/jobs/7/run%20x%2"));
        assert_eq!(decode_separators("/jobs/7%2frun"), "/jobs/7/run");
        assert_eq!(decode_separators("/x/%2E%2e/é%5C"), "/x/../é/");
        assert_eq!(decode_separators("/%2"), "/%2");
    }
}
