//! Redis over TLS for the security suite: a certificate authority and a server certificate
//! generated in the test ([`Pki`]), and a `redis-server` that speaks TLS on one port and plain
//! text on another ([`TlsRedis`]: the plain port is the harness's, for `PING` and inspection).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

use super::cluster::RedisCluster;
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

/// `--tls-cert-file … --tls-key-file … --tls-ca-cert-file … --tls-auth-clients no` for `pki`.
fn tls_files(pki: &Pki) -> Vec<String> {
    let path = |path: &Path| path.to_str().expect("utf-8 temp path").to_owned();
    vec![
        "--tls-cert-file".to_owned(),
        path(&pki.cert_file()),
        "--tls-key-file".to_owned(),
        path(&pki.key_file()),
        "--tls-ca-cert-file".to_owned(),
        path(&pki.ca_file()),
        "--tls-auth-clients".to_owned(),
        "no".to_owned(),
    ]
}

/// `rediss://127.0.0.1:PORT/` for each of `ports`, with `userinfo@` when given.
/// The TLS port `server` was started with.
fn tls_port(server: &RedisServer) -> u16 {
    server
        .arg_port("--tls-port")
        .expect("a server started with --tls-port")
}

fn tls_urls(ports: &[u16], userinfo: Option<&str>) -> Vec<String> {
    let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    ports
        .iter()
        .map(|port| format!("rediss://{userinfo}127.0.0.1:{port}/"))
        .collect()
}

/// A Redis Cluster of 3 primaries over TLS: each node has a TLS port (its certificate from
/// `pki`) besides its plain harness port, the cluster bus speaks TLS (`tls-cluster yes`), and
/// `redis-cli --tls` created it. Redis 7 names the TLS ports to TLS clients and the plain ones
/// to plain clients, so the harness keeps inspecting the cluster in plain text.
pub struct TlsCluster {
    pub cluster: RedisCluster,
    pub tls_ports: Vec<u16>,
    pub pki: Pki,
}

impl TlsCluster {
    pub fn start() -> Self {
        let pki = Pki::generate("cluster");
        let files = tls_files(&pki);
        // A TLS port for each attempt to start a node (see `RedisServer::start_with_each`). The
        // bus port is the TLS port + 10000: keep both under 65536.
        let node_args = |_: usize| {
            let tls_port = loop {
                let port = free_port();
                if port < 55_000 {
                    break port;
                }
            };
            let mut args = vec![
                "--tls-port".to_owned(),
                tls_port.to_string(),
                "--tls-cluster".to_owned(),
                "yes".to_owned(),
                "--tls-replication".to_owned(),
                "yes".to_owned(),
            ];
            args.extend(files.iter().cloned());
            args
        };
        let ca = pki.ca_file().to_str().expect("utf-8 temp path").to_owned();
        let cli = ["--tls".to_owned(), "--cacert".to_owned(), ca];
        let cluster = RedisCluster::start_tls(3, node_args, &cli);
        let tls_ports = cluster.nodes.iter().map(tls_port).collect();
        Self {
            cluster,
            tls_ports,
            pki,
        }
    }

    /// `rediss://` URLs of every node, with `userinfo@` (`user:password`) when given.
    pub fn urls(&self, userinfo: Option<&str>) -> Vec<String> {
        tls_urls(&self.tls_ports, userinfo)
    }
}

/// `n` independent `redis-server`s with TLS (one CA and certificate for all), for Redlock.
pub struct TlsNodes {
    pub servers: Vec<RedisServer>,
    pub tls_ports: Vec<u16>,
    pub pki: Pki,
}

impl TlsNodes {
    pub fn start(n: usize) -> Self {
        Self::start_with(n, &[])
    }

    /// `n` nodes configured further by `args` (`["--tls-auth-clients", "yes"]`, say).
    pub fn start_with(n: usize, extra: &[&str]) -> Self {
        let pki = Pki::generate("redlock");
        let files = tls_files(&pki);
        let servers: Vec<RedisServer> = (0..n)
            .map(|_| {
                RedisServer::start_with_each(|| {
                    let mut args = vec!["--tls-port".to_owned(), free_port().to_string()];
                    args.extend(files.iter().cloned());
                    args.extend(extra.iter().map(|arg| arg.to_string()));
                    args
                })
            })
            .collect();
        let tls_ports = servers.iter().map(tls_port).collect();
        Self {
            servers,
            tls_ports,
            pki,
        }
    }

    /// `rediss://` URLs of every node, with `userinfo@` when given.
    pub fn urls(&self, userinfo: Option<&str>) -> Vec<String> {
        tls_urls(&self.tls_ports, userinfo)
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
        let path = |path: &Path| path.to_str().expect("utf-8 temp path").to_owned();
        let server = RedisServer::start_with_each(|| {
            let mut all = vec![
                "--tls-port".to_owned(),
                free_port().to_string(),
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
            all
        });
        Self {
            tls_port: tls_port(&server),
            server,
            pki,
        }
    }

    /// `rediss://127.0.0.1:TLS_PORT/`, with `userinfo@` (`user:password`) when given.
    pub fn url(&self, userinfo: Option<&str>) -> String {
        let userinfo = userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        format!("rediss://{userinfo}127.0.0.1:{}/", self.tls_port)
    }
}

/// A TLS primary watched by one sentinel that also speaks TLS (on `tls_port`, besides its plain
/// harness port) and reaches the primary over TLS (`tls-replication yes`), so that it names the
/// primary's TLS port.
#[cfg(feature = "sentinel")]
pub struct TlsSentinel {
    pub primary: TlsRedis,
    pub sentinel: super::sentinel::SentinelProcess,
    pub tls_port: u16,
}

#[cfg(feature = "sentinel")]
impl TlsSentinel {
    pub fn start() -> Self {
        let primary = TlsRedis::start(&[]);
        let pki = &primary.pki;
        let path = |path: PathBuf| path.to_str().expect("utf-8 temp path").to_owned();
        // A TLS port for each attempt; the last one picked is the one the sentinel started on.
        let tls_port = std::cell::Cell::new(0);
        let extra = || {
            tls_port.set(free_port());
            format!(
                "tls-port {}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
                 tls-auth-clients no\ntls-replication yes\n",
                tls_port.get(),
                path(pki.cert_file()),
                path(pki.key_file()),
                path(pki.ca_file()),
            )
        };
        // The sentinel monitors the primary's TLS port (quorum 1: it is alone).
        let sentinel =
            super::sentinel::SentinelProcess::start_configured(primary.tls_port, 1, extra);
        Self {
            primary,
            sentinel,
            tls_port: tls_port.get(),
        }
    }

    /// `rediss://127.0.0.1:TLS_PORT/` of the sentinel.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.tls_port)
    }
}
