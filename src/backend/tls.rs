//! TLS to Redis (`rediss://`): the rustls crypto provider, and the clients the backends open.
//!
//! With the crate's `tls-rustls` feature, redis-rs speaks TLS through rustls. rustls needs a
//! process-wide crypto provider before its first handshake (redis-rs panics in its connection
//! task without one); every Redis backend constructor installs ring's as the default when no
//! provider is installed yet, and leaves one that is alone (an application's own choice wins).
//! Without the feature, a `rediss://` URL is refused with an error that says which feature to
//! enable.

use redis::{Client, ErrorKind, RedisError};

/// Installs rustls's ring crypto provider as the process default if none is installed yet.
/// `true` if this call installed it; `false` if a provider was already there (whoever installed
/// it, even concurrently). Never panics.
///
/// The Redis backends call it when they are built; call it yourself before opening redis-rs
/// TLS connections of your own ahead of any backend.
///
/// ```
/// tower_lock::backend::install_crypto_provider();
/// assert!(rustls::crypto::CryptoProvider::get_default().is_some());
/// // Installed once: later calls leave it alone.
/// assert!(!tower_lock::backend::install_crypto_provider());
/// ```
#[cfg(feature = "tls-rustls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls-rustls")))]
pub fn install_crypto_provider() -> bool {
    if rustls::crypto::CryptoProvider::get_default().is_some() {
        return false;
    }
    // `Err` when another thread installed one between the check and here: that one stays.
    rustls::crypto::ring::default_provider()
        .install_default()
        .is_ok()
}

/// Whether `url` asks for TLS (`rediss://`).
fn wants_tls(url: &str) -> bool {
    url.get(..9)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("rediss://"))
}

/// The error for a `rediss://` URL in a build without TLS.
#[cfg_attr(feature = "tls-rustls", allow(dead_code))]
fn tls_not_enabled() -> RedisError {
    RedisError::from((
        ErrorKind::InvalidClientConfig,
        "a rediss:// URL needs TLS: enable tower-lock's `tls-rustls` feature",
    ))
}

/// Checks `urls` (of one backend's nodes) against `certificates`: certificates need every URL
/// to be `rediss://`, and a `rediss://` URL needs the `tls-rustls` feature. With TLS, installs
/// the crypto provider. `true` if the URLs ask for TLS.
///
/// The one check every backend makes, so that one Redis, a Cluster's nodes and a Redlock's
/// nodes refuse the same mistakes with the same errors.
pub(super) fn check_urls<'a>(
    urls: impl IntoIterator<Item = &'a str>,
    certificates: Option<&Certificates>,
) -> Result<bool, RedisError> {
    let mut any_tls = false;
    for url in urls {
        if wants_tls(url) {
            any_tls = true;
        } else if certificates.is_some() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "TLS certificates were given for a URL without TLS: use rediss://",
            )));
        }
    }
    if !any_tls {
        return Ok(false);
    }
    #[cfg(feature = "tls-rustls")]
    {
        install_crypto_provider();
        Ok(true)
    }
    #[cfg(not(feature = "tls-rustls"))]
    {
        Err(tls_not_enabled())
    }
}

/// The redis-rs client for `url`, trusting `certificates` (a CA of one's own, a client
/// certificate) when given, with the crypto provider installed for a `rediss://` URL.
pub(super) fn client(url: &str, certificates: Option<&Certificates>) -> Result<Client, RedisError> {
    if !check_urls([url], certificates)? {
        return Client::open(url);
    }
    #[cfg(feature = "tls-rustls")]
    {
        match certificates {
            Some(certificates) => Client::build_with_tls(url, certificates.to_redis()),
            None => Client::open(url),
        }
    }
    #[cfg(not(feature = "tls-rustls"))]
    {
        let _ = certificates;
        Err(tls_not_enabled())
    }
}

/// What a TLS connection trusts and presents beyond the defaults: PEM bytes, never printed.
#[derive(Clone, Default)]
pub(super) struct Certificates {
    /// The CA certificates (PEM) to trust instead of the platform's roots.
    pub(super) root_cert: Option<Vec<u8>>,
    /// The client certificate chain and its private key (PEM), for mutual TLS.
    pub(super) client: Option<(Vec<u8>, Vec<u8>)>,
}

impl Certificates {
    /// As redis-rs takes them.
    #[cfg(feature = "tls-rustls")]
    pub(super) fn to_redis(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: self.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig {
                    client_cert,
                    client_key,
                }
            }),
            root_cert: self.root_cert.clone(),
        }
    }
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("root_cert", &self.root_cert.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_rediss_scheme_asks_for_tls() {
        assert!(wants_tls("rediss://h:6380/"));
        assert!(wants_tls("REDISS://h/"));
        assert!(!wants_tls("redis://h:6379/"));
        assert!(!wants_tls("redis+unix:///tmp/r.sock"));
        assert!(!wants_tls("rediss"));
        assert!(!wants_tls(""));
    }

    #[test]
    fn certificates_for_a_plain_url_are_refused() {
        let certificates = Certificates {
            root_cert: Some(b"pem".to_vec()),
            client: None,
        };
        let error = client("redis://127.0.0.1:1/", Some(&certificates)).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidClientConfig);
    }

    #[cfg(not(feature = "tls-rustls"))]
    #[test]
    fn a_rediss_url_without_the_feature_names_the_feature() {
        let error = client("rediss://127.0.0.1:1/", None).unwrap_err();
        assert!(error.to_string().contains("tls-rustls"), "{error}");
    }

    #[cfg(feature = "tls-rustls")]
    #[test]
    fn a_rediss_url_installs_the_crypto_provider() {
        client("rediss://127.0.0.1:1/", None).unwrap();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
        assert!(!install_crypto_provider());
    }

    #[test]
    fn certificates_are_never_printed() {
        let certificates = Certificates {
            root_cert: Some(b"-----BEGIN CERTIFICATE-----secret".to_vec()),
            client: Some((b"cert".to_vec(), b"-----BEGIN PRIVATE KEY-----key".to_vec())),
        };
        let printed = format!("{certificates:?}");
        assert!(!printed.contains("BEGIN"), "{printed}");
    }
}
