//! TLS for the load generator, the same for etcd and corekv: `https://` endpoints are
//! dialed with one client identity (`--cacert/--cert/--key`, or the certificates a
//! `--tls` spawn makes), for gRPC (hyper's HTTP/2 client and tonic's channel alike), the
//! native port, and the HTTP reads of etcd's /metrics.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a connection to a server is: plaintext TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

struct ClientTls {
    /// ALPN h2 (gRPC).
    h2: Arc<rustls::ClientConfig>,
    /// ALPN http/1.1 (etcd's /metrics on an https client URL).
    http1: Arc<rustls::ClientConfig>,
}

static CLIENT_TLS: OnceLock<ClientTls> = OnceLock::new();

/// Sets the loader's TLS identity (once per process); the native client gets it too.
pub fn set_client(cacert: &Path, cert: Option<&Path>, key: Option<&Path>) -> Result<(), String> {
    let h2 = corekv::tls::client_config(Some(cacert), cert, key, false)?;
    let mut http1 = (*h2).clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    corekv::client::set_tls(h2.clone(), false);
    if CLIENT_TLS
        .set(ClientTls {
            h2,
            http1: Arc::new(http1),
        })
        .is_err()
    {
        return Err("the loader's TLS identity is already set".into());
    }
    Ok(())
}

/// `--cacert/--cert/--key` of a run against given endpoints.
#[derive(clap::Args, Clone, Default)]
pub struct TlsArgs {
    /// CA of the servers' certificates (https endpoints).
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (servers with --client-cert-auth).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    pub fn apply(&self) -> Result<(), String> {
        match &self.cacert {
            Some(ca) => set_client(ca, self.cert.as_deref(), self.key.as_deref()),
            None if self.cert.is_some() || self.key.is_some() => {
                Err("--cert/--key need --cacert".into())
            }
            None => Ok(()),
        }
    }
}

/// The certificates of a `--tls` spawn: one CA, one server certificate for 127.0.0.1
/// shared by every member of both systems, one client certificate for the loader.
pub struct SpawnCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

static SPAWN_CERTS: OnceLock<Result<SpawnCerts, String>> = OnceLock::new();

/// Made once per process in `dir` (which outlives every deployment of the run).
pub fn spawn_certs(dir: &Path) -> Result<&'static SpawnCerts, String> {
    SPAWN_CERTS
        .get_or_init(|| make_certs(&dir.join(format!("corekv-bench-{}-pki", std::process::id()))))
        .as_ref()
        .map_err(Clone::clone)
}

fn make_certs(dir: &Path) -> Result<SpawnCerts, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa};
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let err = |e: rcgen::Error| e.to_string();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "corekv-bench CA");
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
    let write = |name: &str, text: String| -> Result<PathBuf, String> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    };
    let leaf = |cn: &str, sans: Vec<String>| -> Result<(PathBuf, PathBuf), String> {
        let mut p = CertificateParams::new(sans).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let k = rcgen::KeyPair::generate().map_err(err)?;
        let c = p.signed_by(&k, &issuer).map_err(err)?;
        Ok((
            write(&format!("{cn}.pem"), c.pem())?,
            write(&format!("{cn}-key.pem"), k.serialize_pem())?,
        ))
    };
    let (server_cert, server_key) = leaf("server", vec!["127.0.0.1".into(), "localhost".into()])?;
    let (client_cert, client_key) = leaf("loader", Vec::new())?;
    let ca = write("ca.pem", ca_cert.pem())?;
    set_client(&ca, Some(&client_cert), Some(&client_key))?;
    Ok(SpawnCerts {
        ca,
        server_cert,
        server_key,
    })
}

/// A TCP connection to `url`'s host:port, with TLS for `https://` (ALPN h2).
pub async fn dial(url: &http::Uri) -> Result<Box<dyn Io>, String> {
    dial_as(url, url.scheme_str() == Some("https")).await
}

/// `dial`, with TLS when `https` whatever the URI's scheme says.
async fn dial_as(url: &http::Uri, https: bool) -> Result<Box<dyn Io>, String> {
    let authority = url
        .authority()
        .ok_or_else(|| format!("{url}: no host:port"))?
        .as_str()
        .to_string();
    let tcp = tokio::net::TcpStream::connect(&authority)
        .await
        .map_err(|e| format!("dial {authority}: {e}"))?;
    tcp.set_nodelay(true)
        .map_err(|e| format!("{authority}: {e}"))?;
    if !https {
        return Ok(Box::new(tcp));
    }
    let tls = CLIENT_TLS
        .get()
        .ok_or_else(|| format!("{url}: https endpoint but no --cacert given"))?;
    let name = corekv::tls::server_name(&authority)?;
    let s = tokio_rustls::TlsConnector::from(tls.h2.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS handshake with {authority}: {e}"))?;
    Ok(Box::new(s))
}

/// The blocking HTTP/1.0 GET of etcd's /metrics, over TLS for `https://`.
pub fn http_get(endpoint: &str, path: &str, timeout: std::time::Duration) -> Option<String> {
    use std::io::{Read, Write};
    let (tls, addr) = match endpoint.strip_prefix("https://") {
        Some(a) => (true, a),
        None => (false, endpoint.trim_start_matches("http://")),
    };
    let sock = addr.parse().ok()?;
    let s = std::net::TcpStream::connect_timeout(&sock, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    if tls {
        let cfg = CLIENT_TLS.get()?.http1.clone();
        let conn = rustls::ClientConnection::new(cfg, corekv::tls::server_name(addr).ok()?).ok()?;
        let mut t = rustls::StreamOwned::new(conn, s);
        t.write_all(req.as_bytes()).ok()?;
        // A server closing without close_notify still gave the body.
        let _ = t.take(16 << 20).read_to_string(&mut body);
    } else {
        let mut s = s;
        s.write_all(req.as_bytes()).ok()?;
        s.take(16 << 20).read_to_string(&mut body).ok()?;
    }
    Some(body)
}

/// tonic's channel dials through `dial_as`. tonic is handed `http://` URIs and this
/// connector does the TLS: when a feature elsewhere in the build (etcd-client's `tls`)
/// turns on tonic's own TLS, tonic refuses an `https://` URI it has no TLS config for.
#[derive(Clone)]
pub struct Dialer {
    pub https: bool,
}

impl tower_service::Service<http::Uri> for Dialer {
    type Response = hyper_util::rt::TokioIo<Box<dyn Io>>;
    type Error = String;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, String>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let https = self.https;
        Box::pin(async move { dial_as(&uri, https).await.map(hyper_util::rt::TokioIo::new) })
    }
}
