//! Certificates made at run time (none checked in): a CA, leaf certificates it signs (for
//! servers and clients alike: IP/DNS SANs, both extended key usages, a CN), and CRLs.
#![allow(dead_code)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use std::cell::Cell;
use std::path::{Path, PathBuf};

pub struct Pki {
    pub dir: PathBuf,
    pub ca_file: PathBuf,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    next_serial: Cell<u64>,
}

/// A leaf certificate's files and serial.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub serial: u64,
}

impl Leaf {
    pub fn cert(&self) -> &str {
        self.cert.to_str().expect("utf-8 path")
    }
    pub fn key(&self) -> &str {
        self.key.to_str().expect("utf-8 path")
    }
}

impl Pki {
    /// A new CA named `name` with its certificate in `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        std::fs::create_dir_all(dir).expect("pki dir");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let cert = params.self_signed(&key).expect("self-signed ca");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write ca");
        Pki {
            dir: dir.to_path_buf(),
            ca_file,
            ca_params: params,
            ca_key: key,
            next_serial: Cell::new(100),
        }
    }

    pub fn ca(&self) -> &str {
        self.ca_file.to_str().expect("utf-8 path")
    }

    /// A certificate with CN `cn` valid for `sans` (IPs or DNS names), written as
    /// `<dir>/<file>.pem` and `<dir>/<file>-key.pem`.
    pub fn issue(&self, file: &str, cn: &str, sans: &[&str]) -> Leaf {
        let serial = self.next_serial.get();
        self.next_serial.set(serial + 1);
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().expect("leaf key");
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign leaf");
        let leaf = Leaf {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
            serial,
        };
        std::fs::write(&leaf.key, key.serialize_pem()).expect("write key");
        std::fs::write(&leaf.cert, cert.pem()).expect("write cert");
        leaf
    }

    /// A CRL revoking `serials`, written to `<dir>/<file>.pem`.
    pub fn crl(&self, file: &str, serials: &[u64]) -> PathBuf {
        let params = CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2024, 1, 1),
            next_update: rcgen::date_time_ymd(2099, 1, 1),
            crl_number: SerialNumber::from(self.next_serial.get()),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: rcgen::date_time_ymd(2024, 1, 1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let crl = params.signed_by(&issuer).expect("sign crl");
        let path = self.dir.join(format!("{file}.pem"));
        std::fs::write(&path, crl.pem().expect("crl pem")).expect("write crl");
        path
    }
}

/// The usual TLS test set-up: a CA, a server certificate for 127.0.0.1/localhost and a
/// client certificate (CN `client`), with the `serve` flags for https client URLs under
/// --client-cert-auth and the etcdctl/corekv CLI flags that pass them.
pub struct ClientCertSetup {
    pub pki: Pki,
    pub server: Leaf,
    pub client: Leaf,
}

impl ClientCertSetup {
    pub fn new(dir: &Path, name: &str) -> ClientCertSetup {
        let pki = Pki::new(&dir.join(format!("pki-{name}")), name);
        let server = pki.issue("server", "server", &["127.0.0.1", "localhost"]);
        let client = pki.issue("client", "client", &[]);
        ClientCertSetup {
            pki,
            server,
            client,
        }
    }

    /// `corekv serve` / etcd flags: certificate, key, CA, --client-cert-auth.
    pub fn serve_args(&self) -> Vec<&str> {
        vec![
            "--cert-file",
            self.server.cert(),
            "--key-file",
            self.server.key(),
            "--trusted-ca-file",
            self.pki.ca(),
            "--client-cert-auth",
        ]
    }

    /// etcdctl's (and corekv's) --cacert/--cert/--key for the client certificate.
    pub fn ctl_args(&self) -> Vec<String> {
        vec![
            format!("--cacert={}", self.pki.ca()),
            format!("--cert={}", self.client.cert()),
            format!("--key={}", self.client.key()),
        ]
    }
}
