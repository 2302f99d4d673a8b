//! Seed 004's secure cluster on one machine: three members with https client, native and
//! peer URLs, `--client-cert-auth` and `--peer-client-cert-auth`, one certificate for
//! 127.0.0.1 shared by all members (as the seed's tls-setup makes it); the third member
//! configured through an etcd env file (seed 000's shape). Real etcdctl with
//! --cacert/--cert/--key: endpoint health, member list, put/get across members, watch,
//! snapshot save; a fourth member joins over TLS (member list fetch, snapshot); outsiders
//! with another CA's certificate, or plaintext, cannot speak on the peer port.

mod common;

use common::certs::{Leaf, Pki};
use common::{free_port, have_etcdctl, BIN};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct M {
    name: String,
    client: u16,
    native: u16,
    peer: u16,
    log: std::path::PathBuf,
    child: Option<Child>,
}

impl Drop for M {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl M {
    fn new(dir: &Path, name: &str) -> M {
        M {
            name: name.into(),
            client: free_port(),
            native: free_port(),
            peer: free_port(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }
    fn peer_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.peer)
    }
    fn client_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client)
    }
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// (flag, value) pairs of seed 004's command line for this member.
    fn settings(
        &self,
        dir: &Path,
        cluster: &str,
        state: &str,
        pki: &Pki,
        cert: &Leaf,
    ) -> Vec<(String, String)> {
        [
            ("name", self.name.clone()),
            ("data-dir", dir.join(&self.name).display().to_string()),
            ("listen-peer-urls", self.peer_url()),
            ("initial-advertise-peer-urls", self.peer_url()),
            ("listen-client-urls", self.client_url()),
            ("advertise-client-urls", self.client_url()),
            ("initial-cluster-token", "etcd-cluster-1".into()),
            ("initial-cluster", cluster.into()),
            ("initial-cluster-state", state.into()),
            ("client-cert-auth", "true".into()),
            ("trusted-ca-file", pki.ca().into()),
            ("cert-file", cert.cert().into()),
            ("key-file", cert.key().into()),
            ("peer-client-cert-auth", "true".into()),
            ("peer-trusted-ca-file", pki.ca().into()),
            ("peer-cert-file", cert.cert().into()),
            ("peer-key-file", cert.key().into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
    fn start(&mut self, settings: &[(String, String)], as_env: bool) {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .args([
                "--listen-native-urls",
                &format!("https://127.0.0.1:{}", self.native),
                "--cores",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&self.log).unwrap());
        for (k, v) in settings {
            if as_env {
                cmd.env(format!("ETCD_{}", k.to_uppercase().replace('-', "_")), v);
            } else {
                cmd.arg(format!("--{k}={v}"));
            }
        }
        self.child = Some(cmd.spawn().expect("spawn corekv serve"));
    }
}

fn etcdctl(endpoints: &str, tls: &[String], args: &[&str]) -> Output {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"))
        .args(["--dial-timeout=3s", "--command-timeout=10s"])
        .args(tls)
        .args(args)
        .output()
        .expect("etcdctl")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn wait_for(what: &str, members: &[&M], mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let logs: Vec<String> = members
        .iter()
        .map(|m| format!("--- {}:\n{}", m.name, m.log_text()))
        .collect();
    panic!("{what} did not happen:\n{}", logs.join("\n"));
}

/// A TLS client handshake with the peer port using `cert` (from any CA); Err if refused.
fn peer_handshake(port: u16, pki: &Pki, cert: &Leaf) -> Result<(), String> {
    let cfg = corekv::tls::client_config(
        Some(pki.ca_file.as_path()),
        Some(cert.cert.as_path()),
        Some(cert.key.as_path()),
        true,
    )?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = corekv::tls::server_name("127.0.0.1:1")?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // TLS 1.3 reports a refused client certificate on the first read after the handshake;
    // an accepted one gets the hello's answer (a member list request naming no member).
    let hello = corekv::actors::peer::Hello {
        cluster_id: 0,
        from: 0,
        to: 0,
        purpose: corekv::actors::peer::Purpose::FetchMembers,
        urls: Vec::new(),
    };
    let mut frame = Vec::new();
    corekv::actors::peer::encode_frame(
        &mut frame,
        corekv::actors::peer::KIND_HELLO,
        &postcard::to_allocvec(&hello).unwrap(),
    );
    s.write_all(&frame).map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => Err("closed".into()),
        Ok(_) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn seed_004_secure_cluster_with_etcdctl() {
    if !have_etcdctl() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("certs"), "seed");
    let cert = pki.issue("127.0.0.1", "127.0.0.1", &["127.0.0.1", "localhost"]);
    let client = pki.issue("client", "client", &[]);
    let other = Pki::new(&dir.path().join("other"), "other");
    let outsider = other.issue("outsider", "127.0.0.1", &["127.0.0.1"]);
    let tls = vec![
        format!("--cacert={}", pki.ca()),
        format!("--cert={}", client.cert()),
        format!("--key={}", client.key()),
    ];

    let mut ms: Vec<M> = (0..3)
        .map(|i| M::new(dir.path(), &format!("infra{i}")))
        .collect();
    let cluster = ms
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    for (i, m) in ms.iter_mut().enumerate() {
        let settings = m.settings(dir.path(), &cluster, "new", &pki, &cert);
        m.start(&settings, i == 2);
    }
    let all = ms.iter().map(M::client_url).collect::<Vec<_>>().join(",");
    let refs: Vec<&M> = ms.iter().collect();
    wait_for("a healthy cluster", &refs, || {
        etcdctl(&all, &tls, &["endpoint", "health"])
            .status
            .success()
    });
    let health = etcdctl(
        &ms[0].client_url(),
        &tls,
        &["endpoint", "health", "--cluster"],
    );
    assert!(health.status.success(), "{}", text(&health));
    assert_eq!(
        text(&health).matches("is healthy").count(),
        3,
        "{}",
        text(&health)
    );
    let list = etcdctl(&ms[0].client_url(), &tls, &["member", "list"]);
    for m in &ms {
        assert!(
            text(&list).contains(&format!(
                "started, {}, {}, {}",
                m.name,
                m.peer_url(),
                m.client_url()
            )),
            "{}",
            text(&list)
        );
    }

    // A watch on one member sees a put made through another.
    let mut watch = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", ms[2].client_url()))
        .args(&tls)
        .args(["watch", "a"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let put = etcdctl(&ms[0].client_url(), &tls, &["put", "a", "b"]);
    assert_eq!(text(&put).trim(), "OK");
    let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
    let seen: Vec<String> = (0..3)
        .map_while(|_| lines.next().and_then(Result::ok))
        .collect();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(seen, ["PUT", "a", "b"]);
    let get = etcdctl(
        &ms[1].client_url(),
        &tls,
        &["get", "a", "--print-value-only"],
    );
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        "b",
        "{}",
        text(&get)
    );
    let snap = dir.path().join("snapshot.db");
    let saved = etcdctl(
        &ms[1].client_url(),
        &tls,
        &["snapshot", "save", snap.to_str().unwrap()],
    );
    assert!(saved.status.success(), "{}", text(&saved));

    // Outsiders on the peer port: another CA's certificate, or plaintext.
    let e = peer_handshake(ms[0].peer, &other, &outsider).unwrap_err();
    assert!(!e.is_empty());
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", ms[0].peer)).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = plain.write_all(b"\x20\x00\x00\x00\x01plaintext hello from nobody.....");
    let mut b = [0u8; 64];
    let n = plain.read(&mut b).unwrap_or(0);
    assert!(
        n == 0 || b[0] == 0x15,
        "plaintext peer got an answer: {:?}",
        &b[..n]
    );
    let log = ms[0].log_text();
    assert!(
        log.contains("peer connection refused: TLS handshake refused"),
        "{log}"
    );
    // Our own CA's certificate completes the handshake (the refusals above were the CA's).
    peer_handshake(ms[0].peer, &pki, &cert).expect("a member certificate is accepted");

    // A fourth member joins over TLS: the member list and the snapshot come over it.
    let mut joiner = M::new(dir.path(), "infra3");
    let add = etcdctl(
        &ms[0].client_url(),
        &tls,
        &[
            "member",
            "add",
            "infra3",
            &format!("--peer-urls={}", joiner.peer_url()),
        ],
    );
    assert!(add.status.success(), "{}", text(&add));
    let cluster4 = format!("{cluster},infra3={}", joiner.peer_url());
    let settings = joiner.settings(dir.path(), &cluster4, "existing", &pki, &cert);
    joiner.start(&settings, false);
    let mut refs: Vec<&M> = ms.iter().collect();
    refs.push(&joiner);
    wait_for("the fourth member serving", &refs, || {
        let o = etcdctl(
            &joiner.client_url(),
            &tls,
            &["get", "a", "--print-value-only"],
        );
        String::from_utf8_lossy(&o.stdout).trim() == "b"
    });
    let list = etcdctl(&ms[0].client_url(), &tls, &["member", "list"]);
    assert_eq!(text(&list).matches("started").count(), 4, "{}", text(&list));
}
