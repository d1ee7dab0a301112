//! Redis over TLS for the security suite: a certificate authority and a server certificate
//! generated in the test ([`Pki`]), and a `redis-server` that speaks TLS on one port and plain
//! text on another ([`TlsRedis`]: the plain port is the harness's, for `PING` and inspection).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::{RedisServer, free_port};

/// A CA and a certificate it signed for `127.0.0.1` and `localhost`, written as PEM files in a
/// temp dir of their own (removed on drop).
pub struct Pki {
    dir: PathBuf,
    /// The CA's certificate (PEM): what a client must trust.
    pub ca_pem: String,
    /// A client certificate the CA signed (PEM), for mutual TLS.
    pub client_cert_pem: String,
    /// Its private key (PEM).
    pub client_key_pem: String,
}

impl Pki {
    /// A fresh CA named `name` and a server certificate it signed.
    pub fn generate(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!(
            "tower-lock-pki-{}-{name}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create pki dir");

        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("tower-lock test CA {name}"));
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("ca key"))
            .expect("self-signed ca");

        let key = KeyPair::generate().expect("server key");
        let mut server =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        server
            .distinguished_name
            .push(DnType::CommonName, "tower-lock test redis");
        let cert = server.signed_by(&key, &ca).expect("server certificate");

        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(DnType::CommonName, "tower-lock test client");
        client.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &ca)
            .expect("client certificate");

        let pki = Self {
            dir,
            ca_pem: ca.pem(),
            client_cert_pem: client_cert.pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        std::fs::write(pki.ca_file(), &pki.ca_pem).expect("write ca");
        std::fs::write(pki.cert_file(), cert.pem()).expect("write cert");
        std::fs::write(pki.key_file(), key.serialize_pem()).expect("write key");
        pki
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("redis.pem")
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.join("redis.key")
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` with TLS on [`TlsRedis::tls_port`] (server certificate from `pki`, client
/// certificates not required) and plain text on its harness port, configured further by `args`.
pub struct TlsRedis {
    pub server: RedisServer,
    pub tls_port: u16,
    pub pki: Pki,
}

impl TlsRedis {
    pub fn start(args: &[&str]) -> Self {
        let pki = Pki::generate("server");
        let tls_port = free_port();
        let path = |path: &Path| path.to_str().expect("utf-8 temp path").to_owned();
        let mut all = vec![
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            path(&pki.cert_file()),
            "--tls-key-file".to_owned(),
            path(&pki.key_file()),
            "--tls-ca-cert-file".to_owned(),
            path(&pki.ca_file()),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        all.extend(args.iter().map(|arg| arg.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let server = RedisServer::start_with(&all);
        Self {
            server,
            tls_port,
            pki,
        }
    }

    /// `rediss://127.0.0.1:TLS_PORT/`, with `userinfo@` (`user:password`) when given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        format!("rediss://{userinfo}127.0.0.1:{}/", self.tls_port)
    }
}
