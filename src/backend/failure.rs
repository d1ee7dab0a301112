//! What a redis-rs error says happened on the way to Redis: the [`FailureReason`] of the
//! [`BackendError`](super::BackendError) a Redis backend answers.

use std::error::Error as _;
use std::sync::Arc;

use redis::{ErrorKind, RedisError};

use super::FailureReason;

/// The reason `error` gives: denied (credentials, ACL), TLS, timed out, refused, or other.
pub(super) fn reason(error: &RedisError) -> FailureReason {
    if is_denied(error) {
        FailureReason::Denied
    } else if is_tls(error) {
        FailureReason::Tls
    } else if error.is_timeout() {
        FailureReason::TimedOut
    } else if error.is_connection_refusal() || error.is_connection_dropped() {
        FailureReason::Refused
    } else {
        FailureReason::Other
    }
}

/// A refused password or user (`WRONGPASS`, `NOAUTH`) or an ACL refusal: `NOPERM`, or inside a
/// script, an `ERR` that says "The user executing the script can't …".
fn is_denied(error: &RedisError) -> bool {
    const SAYS_DENIED: [&str; 4] = [
        "WRONGPASS",
        "NOAUTH",
        "NOPERM",
        "user executing the script can't",
    ];
    error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
        || error
            .detail()
            .is_some_and(|detail| SAYS_DENIED.iter().any(|says| detail.contains(says)))
}

/// A failed TLS handshake: the I/O error redis-rs wraps carries a `rustls::Error`.
fn is_tls(error: &RedisError) -> bool {
    // redis-rs keeps the I/O error behind an `Arc<dyn Error>`, and `io::Error::source` skips the
    // error it wraps: reach the wrapped one with `get_ref`.
    let Some(io) = error
        .source()
        .and_then(|source| source.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>())
        .and_then(|shared| shared.downcast_ref::<std::io::Error>())
    else {
        return false;
    };
    let Some(inner) = io.get_ref() else {
        return false;
    };
    #[cfg(feature = "tls-rustls")]
    if inner.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    // Without the feature no TLS connection is made; a wrapper of ours never holds one either.
    let _ = inner;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(kind: std::io::ErrorKind) -> RedisError {
        RedisError::from(std::io::Error::from(kind))
    }

    #[test]
    fn io_errors_are_refused_or_timed_out() {
        assert_eq!(
            reason(&io(std::io::ErrorKind::ConnectionRefused)),
            FailureReason::Refused
        );
        assert_eq!(
            reason(&io(std::io::ErrorKind::ConnectionReset)),
            FailureReason::Refused
        );
        assert_eq!(
            reason(&io(std::io::ErrorKind::TimedOut)),
            FailureReason::TimedOut
        );
    }

    #[test]
    fn authentication_failures_are_denied() {
        let error = RedisError::from((
            ErrorKind::AuthenticationFailed,
            "Password authentication failed",
        ));
        assert_eq!(reason(&error), FailureReason::Denied);
        // What Redis 7 answers when a script calls a command the user may not run.
        let error = RedisError::from((
            ErrorKind::Extension,
            "An error was signalled by the server",
            "The user executing the script can't run this command or subcommand script: 6163, \
             on @user_script:1."
                .to_owned(),
        ));
        assert_eq!(reason(&error), FailureReason::Denied);
        let error = RedisError::from((ErrorKind::Client, "other"));
        assert_eq!(reason(&error), FailureReason::Other);
    }

    #[cfg(feature = "tls-rustls")]
    #[test]
    fn a_rustls_error_under_io_is_tls() {
        let error = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        assert_eq!(reason(&error), FailureReason::Tls);
        let error = RedisError::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not tls",
        ));
        assert_eq!(reason(&error), FailureReason::Other);
    }
}
