//! The one TLS layer every listener and the peer transport use (rustls, ring provider):
//! certificate and key loading with reload when their files change (etcd re-reads them
//! per handshake), client-certificate verification against `--trusted-ca-file` with the
//! CRL re-read when it changes, `--auto-tls` self-signed certificates, cipher suites and
//! protocol versions by etcd's names, and the client side (peers, the CLI).
//!
//! Reloading checks the files' modification stamps on each handshake (two `stat`s, no
//! lock); a file that fails to load keeps the previous certificate and logs why.

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme, SupportedProtocolVersion,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// How long a TLS handshake may take before the connection is dropped (a client that
/// connects and says nothing must not hold a task forever).
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;

/// One side's TLS flags as given (client side: `--cert-file`, ...; peer side:
/// `--peer-cert-file`, ...).
#[derive(Clone, Debug, Default)]
pub struct TlsFlags {
    /// "client" or "peer": names the flags in errors.
    pub side: &'static str,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub trusted_ca_file: Option<PathBuf>,
    pub client_cert_auth: bool,
    pub crl_file: Option<PathBuf>,
    pub auto_tls: bool,
    pub allowed_cn: Option<String>,
    pub allowed_hostname: Option<String>,
    /// Peers: --experimental-peer-skip-client-san-verification (a member's certificate
    /// need not name its peer URL's host).
    pub skip_client_san: bool,
}

/// `--cipher-suites`, `--tls-min-version`, `--tls-max-version` (shared by both sides).
#[derive(Clone, Debug, Default)]
pub struct TlsOptions {
    pub cipher_suites: Option<String>,
    pub min_version: String,
    pub max_version: String,
}

impl TlsFlags {
    fn flag(&self, name: &str) -> String {
        match self.side {
            "peer" => format!("--peer-{name}"),
            _ => format!("--{name}"),
        }
    }

    /// The flag of `crl_file` on this side.
    fn crl_flag(&self) -> &'static str {
        match self.side {
            "peer" => "--peer-crl-file",
            _ => "--client-crl-file",
        }
    }

    /// The flag of `allowed_hostname` on this side.
    fn hostname_flag(&self) -> &'static str {
        match self.side {
            "peer" => "--peer-cert-allowed-hostname",
            _ => "--client-cert-allowed-hostname",
        }
    }
}

/// What a TLS side of the server runs with, built once at start-up.
#[derive(Clone)]
pub struct TlsSide {
    pub server: Arc<ServerConfig>,
    /// The same identity as a client (peers dial each other with it).
    pub client: Arc<ClientConfig>,
    pub client_cert_auth: bool,
    pub allowed_cn: Option<String>,
    pub allowed_hostname: Option<String>,
    pub skip_client_san: bool,
}

impl std::fmt::Debug for TlsSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSide")
            .field("client_cert_auth", &self.client_cert_auth)
            .field("allowed_cn", &self.allowed_cn)
            .field("allowed_hostname", &self.allowed_hostname)
            .finish()
    }
}

/// rustls' ring provider. (Deprecated in rustls 0.23.48 for lacking post-quantum key
/// exchange, which etcd's Go TLS 1.3 does not insist on either; aws-lc-rs, the other
/// provider, needs a C toolchain with cmake the README's fresh machine lacks.)
#[allow(deprecated)]
fn ring_provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring_provider())
}

/// Protocol versions from etcd 3.5's `--tls-min-version` / `--tls-max-version` values.
fn versions(opts: &TlsOptions) -> Result<Vec<&'static SupportedProtocolVersion>, String> {
    fn rank(flag: &str, v: &str, default: u8) -> Result<u8, String> {
        match v {
            "" => Ok(default),
            "TLS1.2" => Ok(2),
            "TLS1.3" => Ok(3),
            "TLS1.0" | "TLS1.1" => Err(format!(
                "{flag} {v}: not supported by corekv (rustls implements TLS1.2 and TLS1.3)"
            )),
            _ => Err(format!(
                "{flag} {v}: unknown TLS version (TLS1.2 or TLS1.3)"
            )),
        }
    }
    let min = rank("--tls-min-version", &opts.min_version, 2)?;
    let max = rank("--tls-max-version", &opts.max_version, 3)?;
    if min > max {
        return Err(format!(
            "--tls-min-version {} is above --tls-max-version {}",
            opts.min_version, opts.max_version
        ));
    }
    let mut out = Vec::new();
    if min <= 2 {
        out.push(&rustls::version::TLS12);
    }
    if max >= 3 {
        out.push(&rustls::version::TLS13);
    }
    assert!(!out.is_empty());
    Ok(out)
}

/// The ring provider restricted to `--cipher-suites` (Go's names, as etcd takes them;
/// they name TLS 1.2 suites: TLS 1.3's are always on, as in Go).
fn provider_for(opts: &TlsOptions) -> Result<Arc<CryptoProvider>, String> {
    let mut p = ring_provider();
    let Some(list) = opts
        .cipher_suites
        .as_deref()
        .filter(|s| !s.trim().is_empty())
    else {
        return Ok(Arc::new(p));
    };
    if opts.min_version == "TLS1.3" {
        return Err("cipher suites cannot be configured when only TLS1.3 is enabled".into());
    }
    let mut keep = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        // Go spells the ChaCha suites without their hash as well.
        let canonical = match name {
            "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305" => "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
            "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305" => {
                "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
            }
            n => n,
        };
        let found = p.cipher_suites.iter().find(|s| {
            s.version() == &rustls::version::TLS12 && format!("{:?}", s.suite()) == canonical
        });
        match found {
            Some(s) => keep.push(*s),
            None => {
                let known: Vec<String> = p
                    .cipher_suites
                    .iter()
                    .filter(|s| s.version() == &rustls::version::TLS12)
                    .map(|s| format!("{:?}", s.suite()))
                    .collect();
                return Err(format!(
                    "--cipher-suites: unsupported cipher suite {name:?} (corekv implements {})",
                    known.join(", ")
                ));
            }
        }
    }
    let tls13: Vec<_> = p
        .cipher_suites
        .iter()
        .filter(|s| s.version() == &rustls::version::TLS13)
        .copied()
        .collect();
    keep.extend(tls13);
    p.cipher_suites = keep;
    Ok(Arc::new(p))
}

/// A file's identity for change detection: modification time, size and inode.
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn load_key_pair(cert: &Path, key: &Path, p: &CryptoProvider) -> Result<CertifiedKey, String> {
    let chain = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{}: no usable PEM private key: {e}", key.display()))?;
    CertifiedKey::from_der(chain, key_der, p).map_err(|e| {
        format!(
            "{} / {}: certificate and key do not load together: {e}",
            cert.display(),
            key.display()
        )
    })
}

/// A certificate + key pair re-read when either file changes.
#[derive(Debug)]
pub struct ReloadingKey {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: ArcSwap<(Stamp, Stamp, Arc<CertifiedKey>)>,
}

impl ReloadingKey {
    pub fn open(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, String> {
        let (sc, sk) = (stamp(cert), stamp(key));
        let loaded = load_key_pair(cert, key, &provider)?;
        Ok(ReloadingKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            provider,
            current: ArcSwap::from_pointee((sc, sk, Arc::new(loaded))),
        })
    }

    /// The pair for this handshake: reloaded first when a file changed.
    pub fn get(&self) -> Arc<CertifiedKey> {
        let cur = self.current.load();
        let (sc, sk) = (stamp(&self.cert), stamp(&self.key));
        if cur.0 == sc && cur.1 == sk {
            return cur.2.clone();
        }
        match load_key_pair(&self.cert, &self.key, &self.provider) {
            Ok(k) => {
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                let k = Arc::new(k);
                self.current.store(Arc::new((sc, sk, k.clone())));
                k
            }
            Err(e) => {
                // Half-written files during a rotation: keep serving the old pair and try
                // again on the next handshake.
                tracing::warn!("TLS certificate reload failed, keeping the previous one: {e}");
                cur.2.clone()
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for ReloadingKey {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

impl rustls::client::ResolvesClientCert for ReloadingKey {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls: Vec<_> = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| format!("open {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if crls.is_empty() {
        // etcd reads DER CRLs too.
        let der = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        return Ok(vec![CertificateRevocationListDer::from(der)]);
    }
    Ok(crls)
}

/// Client certificates verified against the trusted CA (fixed at start-up, as etcd) and
/// the CRL file, re-read when it changes (etcd reads it per connection).
#[derive(Debug)]
struct CrlReloadingVerifier {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    /// Start-up verifier: answers the root hints (which depend on the CA only).
    hints: Arc<dyn ClientCertVerifier>,
    crl: Option<PathBuf>,
    current: ArcSwap<(Stamp, Arc<dyn ClientCertVerifier>)>,
}

fn build_verifier(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crl: Option<&Path>,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut b = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone());
    if let Some(path) = crl {
        b = b.with_crls(load_crls(path)?);
    }
    b.build()
        .map_err(|e| format!("client certificate verifier: {e}"))
}

impl CrlReloadingVerifier {
    fn new(
        roots: Arc<RootCertStore>,
        provider: Arc<CryptoProvider>,
        crl: Option<PathBuf>,
    ) -> Result<Self, String> {
        let s = crl.as_deref().and_then(stamp);
        let v = build_verifier(&roots, &provider, crl.as_deref())?;
        Ok(CrlReloadingVerifier {
            roots,
            provider,
            hints: v.clone(),
            crl,
            current: ArcSwap::from_pointee((s, v)),
        })
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        let cur = self.current.load();
        let Some(path) = &self.crl else {
            return cur.1.clone();
        };
        let s = stamp(path);
        if s == cur.0 {
            return cur.1.clone();
        }
        match build_verifier(&self.roots, &self.provider, Some(path)) {
            Ok(v) => {
                tracing::info!(crl = %path.display(), "client CRL reloaded");
                self.current.store(Arc::new((s, v.clone())));
                v
            }
            Err(e) => {
                tracing::warn!("CRL reload failed, keeping the previous one: {e}");
                cur.1.clone()
            }
        }
    }
}

impl ClientCertVerifier for CrlReloadingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.hints.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.hints.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.hints.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.hints.supported_verify_schemes()
    }
}

/// Accepts any server certificate: `--insecure-skip-tls-verify`, and peers under
/// `--peer-auto-tls` (self-signed certificates cannot be verified; etcd does the same).
#[derive(Debug)]
pub struct SkipServerVerification(pub Arc<CryptoProvider>);

impl ServerCertVerifier for SkipServerVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `--auto-tls` / `--peer-auto-tls`: a self-signed certificate for `hosts`, kept in
/// `<data-dir>/fixtures/<side>/` (etcd's place) and reused on restart.
fn auto_cert(dir: &Path, hosts: &[String]) -> Result<(PathBuf, PathBuf), String> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut names: Vec<String> = hosts.to_vec();
    if names.is_empty() {
        names.push("localhost".into());
    }
    let generated = rcgen::generate_simple_self_signed(names)
        .map_err(|e| format!("generate a self-signed certificate: {e}"))?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem())
        .map_err(|e| format!("write {}: {e}", cert.display()))?;
    tracing::info!(cert = %cert.display(), "generated a self-signed certificate (auto TLS)");
    Ok((cert, key))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write {}: {e}", path.display()))
}

/// Builds one side's TLS from its flags, or None when it has no certificate (then an
/// `https://` URL of that side is refused by the caller). `hosts` are the side's listen
/// hosts (for auto TLS), `data_dir` where auto TLS keeps its files.
pub fn build_side(
    flags: &TlsFlags,
    opts: &TlsOptions,
    data_dir: &Path,
    hosts: &[String],
) -> Result<Option<TlsSide>, String> {
    let provider = provider_for(opts)?;
    let versions = versions(opts)?;
    if flags.cert_file.is_some() != flags.key_file.is_some() {
        return Err(format!(
            "{} and {} must be given together",
            flags.flag("cert-file"),
            flags.flag("key-file")
        ));
    }
    let (cert, key, self_signed) = match (&flags.cert_file, &flags.key_file) {
        (Some(c), Some(k)) => {
            if flags.auto_tls {
                tracing::warn!("ignoring {} since certs given", flags.flag("auto-tls"));
            }
            (c.clone(), k.clone(), false)
        }
        _ if flags.auto_tls => {
            let (c, k) = auto_cert(&data_dir.join("fixtures").join(flags.side), hosts)?;
            (c, k, true)
        }
        _ => {
            for (set, name) in [
                (
                    flags.trusted_ca_file.is_some(),
                    flags.flag("trusted-ca-file"),
                ),
                (flags.client_cert_auth, flags.flag("client-cert-auth")),
                (flags.crl_file.is_some(), flags.crl_flag().to_string()),
                (
                    flags.allowed_cn.is_some(),
                    "--peer-cert-allowed-cn".to_string(),
                ),
                (
                    flags.allowed_hostname.is_some(),
                    flags.hostname_flag().to_string(),
                ),
            ] {
                if set {
                    return Err(format!(
                        "{name} needs {} and {} (or {})",
                        flags.flag("cert-file"),
                        flags.flag("key-file"),
                        flags.flag("auto-tls")
                    ));
                }
            }
            return Ok(None);
        }
    };
    if !flags.client_cert_auth {
        let named = [
            (flags.allowed_cn.is_some(), "--peer-cert-allowed-cn"),
            (flags.allowed_hostname.is_some(), flags.hostname_flag()),
        ];
        if let Some((_, name)) = named.iter().find(|(set, _)| *set) {
            return Err(format!(
                "{name} needs {}: no certificate is asked for without it",
                flags.flag("client-cert-auth")
            ));
        }
    }
    let identity = Arc::new(ReloadingKey::open(&cert, &key, provider.clone())?);
    let roots = flags
        .trusted_ca_file
        .as_deref()
        .map(load_roots)
        .transpose()?;
    let verifier: Arc<dyn ClientCertVerifier> = if flags.client_cert_auth {
        let Some(roots) = roots.clone() else {
            return Err(format!(
                "{} needs {}: there is no CA to verify client certificates against",
                flags.flag("client-cert-auth"),
                flags.flag("trusted-ca-file")
            ));
        };
        Arc::new(CrlReloadingVerifier::new(
            roots,
            provider.clone(),
            flags.crl_file.clone(),
        )?)
    } else {
        if flags.crl_file.is_some() {
            return Err(format!(
                "{} needs {}: without it no client certificate is asked for",
                flags.crl_flag(),
                flags.flag("client-cert-auth")
            ));
        }
        rustls::server::WebPkiClientVerifier::no_client_auth()
    };
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(identity.clone());
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS versions: {e}"))?;
    let client = match (&roots, self_signed) {
        (Some(r), _) => builder
            .with_root_certificates(r.clone())
            .with_client_cert_resolver(identity),
        (None, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider)))
            .with_client_cert_resolver(identity),
        // No CA file: the system's roots, as Go's client (hence etcd's peers) uses.
        (None, false) => builder
            .with_root_certificates(Arc::new(system_roots()))
            .with_client_cert_resolver(identity),
    };
    Ok(Some(TlsSide {
        server: Arc::new(server),
        client: Arc::new(client),
        client_cert_auth: flags.client_cert_auth,
        allowed_cn: flags.allowed_cn.clone(),
        allowed_hostname: flags.allowed_hostname.clone(),
        skip_client_san: flags.skip_client_san,
    }))
}

/// The subject CN of a DER certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = c.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// `--peer-cert-allowed-cn` / `--peer-cert-allowed-hostname` (peers) and
/// `--client-cert-allowed-hostname` (clients) on the verified certificate of the other
/// side, checked right after the handshake, before anything is read from it.
pub fn check_identity(side: &TlsSide, certs: Option<&[CertificateDer<'_>]>) -> Result<(), String> {
    if side.allowed_cn.is_none() && side.allowed_hostname.is_none() {
        return Ok(());
    }
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Err("no certificate presented".into());
    };
    if let Some(cn) = &side.allowed_cn {
        let got = common_name(leaf);
        if got.as_deref() != Some(cn.as_str()) {
            return Err(format!(
                "certificate CN {got:?} is not the allowed CN {cn:?}"
            ));
        }
    }
    if let Some(host) = &side.allowed_hostname {
        if !cert_valid_for(leaf, host) {
            return Err(format!("certificate is not valid for {host}"));
        }
    }
    Ok(())
}

/// Is `cert` valid for `host` (a DNS name or an IP, as rustls checks server names)?
pub fn cert_valid_for(cert: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(name) = ServerName::try_from(host) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// The TLS server name for dialing `host:port` (an IP or a DNS name).
pub fn server_name(hostport: &str) -> Result<ServerName<'static>, String> {
    let host = crate::cluster::host_of(hostport);
    ServerName::try_from(host.clone()).map_err(|e| format!("TLS server name {host:?}: {e}"))
}

/// `https://` (TLS) or `http://` / no scheme (plaintext); anything else is refused.
pub fn url_is_tls(url: &str) -> Result<bool, String> {
    match url.split_once("://") {
        None => Ok(false),
        Some(("http", _)) => Ok(false),
        Some(("https", _)) => Ok(true),
        Some((scheme, _)) => Err(format!(
            "URL scheme must be http or https: {url} has {scheme:?}"
        )),
    }
}

/// The CLI's (and bench's) client TLS: etcdctl's `--cacert`, `--cert`, `--key`,
/// `--insecure-skip-tls-verify`.
pub fn client_config(
    cacert: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
    skip_verify: bool,
) -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| format!("TLS versions: {e}"))?;
    let builder = if skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipServerVerification(provider.clone())))
    } else {
        let roots = match cacert {
            Some(p) => load_roots(p)?,
            None => Arc::new(system_roots()),
        };
        builder.with_root_certificates(roots)
    };
    let mut cfg = match (cert, key) {
        (Some(c), Some(k)) => {
            builder.with_client_cert_resolver(Arc::new(ReloadingKey::open(c, k, provider)?))
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("--cert and --key must be given together".into()),
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Debian's CA bundle (etcdctl uses the system roots without `--cacert`).
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let bundle = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if let Ok(certs) = load_certs(bundle) {
        roots.add_parsable_certificates(certs);
    }
    roots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_suites_by_etcd_names() {
        let o = |min: &str, max: &str, cs: Option<&str>| TlsOptions {
            cipher_suites: cs.map(str::to_owned),
            min_version: min.into(),
            max_version: max.into(),
        };
        assert_eq!(versions(&o("", "", None)).unwrap().len(), 2);
        assert_eq!(versions(&o("TLS1.3", "", None)).unwrap().len(), 1);
        assert!(versions(&o("TLS1.1", "", None))
            .unwrap_err()
            .contains("not supported"));
        assert!(versions(&o("TLS1.3", "TLS1.2", None)).is_err());
        let p = provider_for(&o("", "", Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"))).unwrap();
        let tls12 = p
            .cipher_suites
            .iter()
            .filter(|s| s.version() == &rustls::version::TLS12)
            .count();
        assert_eq!(tls12, 1);
        let e = provider_for(&o("", "", Some("TLS_RSA_WITH_3DES_EDE_CBC_SHA"))).unwrap_err();
        assert!(e.contains("unsupported cipher suite"), "{e}");
        assert!(provider_for(&o(
            "TLS1.3",
            "",
            Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
        ))
        .is_err());
    }

    #[test]
    fn allowed_cn_and_hostname_are_checked() {
        let mut params = rcgen::CertificateParams::new(vec!["a.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "member-a");
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        let side = |cn: Option<&str>, host: Option<&str>| {
            let flags = TlsFlags {
                side: "peer",
                auto_tls: true,
                ..Default::default()
            };
            let dir = tempfile::tempdir().unwrap();
            let mut s = build_side(&flags, &TlsOptions::default(), dir.path(), &[])
                .unwrap()
                .unwrap();
            s.allowed_cn = cn.map(str::to_owned);
            s.allowed_hostname = host.map(str::to_owned);
            s
        };
        let certs = [der];
        assert_eq!(common_name(&certs[0]).as_deref(), Some("member-a"));
        assert!(check_identity(&side(Some("member-a"), None), Some(&certs)).is_ok());
        assert!(check_identity(&side(Some("member-b"), None), Some(&certs)).is_err());
        assert!(check_identity(&side(None, Some("a.example")), Some(&certs)).is_ok());
        assert!(check_identity(&side(None, Some("b.example")), Some(&certs)).is_err());
        assert!(check_identity(&side(Some("member-a"), None), None).is_err());
        assert!(check_identity(&side(None, None), None).is_ok());
    }

    #[test]
    fn url_schemes() {
        assert!(url_is_tls("https://127.0.0.1:2379").unwrap());
        assert!(!url_is_tls("http://127.0.0.1:2379").unwrap());
        assert!(!url_is_tls("127.0.0.1:2379").unwrap());
        assert!(url_is_tls("unix://x").is_err());
    }

    #[test]
    fn auto_tls_makes_a_certificate_once_and_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let flags = TlsFlags {
            side: "client",
            auto_tls: true,
            ..Default::default()
        };
        let side = build_side(
            &flags,
            &TlsOptions::default(),
            dir.path(),
            &["127.0.0.1".into()],
        )
        .unwrap()
        .expect("auto tls side");
        assert!(!side.client_cert_auth);
        let cert = dir.path().join("fixtures/client/cert.pem");
        let before = std::fs::read(&cert).unwrap();
        build_side(&flags, &TlsOptions::default(), dir.path(), &[]).unwrap();
        assert_eq!(
            before,
            std::fs::read(&cert).unwrap(),
            "reused, not regenerated"
        );
        let none = TlsFlags {
            side: "client",
            client_cert_auth: true,
            ..Default::default()
        };
        let e = build_side(&none, &TlsOptions::default(), dir.path(), &[]).unwrap_err();
        assert!(e.contains("--client-cert-auth needs --cert-file"), "{e}");
    }
}
