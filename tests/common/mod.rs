//! Test harness: real `corekv serve` processes on loopback with their own data dirs.
#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_corekv");

/// A free loopback port never handed out before in this test process: tests run in
/// parallel, and the kernel may give a just-released port to the next bind(0); two
/// servers on one port would share it (SO_REUSEPORT) and answer each other's clients.
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
    panic!("no unused loopback port after 1000 tries");
}

pub struct Server {
    pub child: Option<Child>,
    pub data_dir: PathBuf,
    pub port: u16,
    /// etcd v3 gRPC port.
    pub grpc_port: u16,
    pub peer_port: u16,
    pub extra: Vec<String>,
    pub log: PathBuf,
    /// TLS: the serve flags giving the certificates and the CLI's --cacert/--cert/--key;
    /// then the client and native URLs are https. None: plaintext.
    pub tls: Option<(Vec<String>, Vec<String>)>,
}

impl Server {
    /// Starts a server in `data_dir` and waits until it accepts connections.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Server::start_with(data_dir, extra, None)
    }

    /// A server whose client and native URLs are https: `serve_tls` are its certificate
    /// flags, `ctl_tls` what its own CLI calls pass (--cacert, --cert, --key).
    pub fn start_tls(
        data_dir: &Path,
        extra: &[&str],
        serve_tls: &[&str],
        ctl_tls: &[&str],
    ) -> Server {
        let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Server::start_with(data_dir, extra, Some((own(serve_tls), own(ctl_tls))))
    }

    fn start_with(
        data_dir: &Path,
        extra: &[&str],
        tls: Option<(Vec<String>, Vec<String>)>,
    ) -> Server {
        let mut s = Server {
            child: None,
            data_dir: data_dir.to_path_buf(),
            port: free_port(),
            grpc_port: free_port(),
            peer_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: data_dir.with_extension("log"),
            tls,
        };
        s.restart();
        s
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.grpc_port)
    }

    /// The command line `corekv serve` runs with (for tests that expect a failure).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        let scheme = self.scheme();
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-native-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", self.port))
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", self.grpc_port))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://127.0.0.1:{}", self.grpc_port))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .args(&self.extra);
        if let Some((serve_tls, _)) = &self.tls {
            cmd.args(serve_tls);
        }
        cmd
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn corekv serve");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!(
                        "server exited early ({status}):\n{}",
                        std::fs::read_to_string(&self.log).unwrap_or_default()
                    );
                }
            }
            // Ready once a linearizable read succeeds (leader elected, WAL open), or is
            // refused for want of a user (auth enabled: the native port serves nobody).
            let out = self.ctl(&["get", "readiness-probe"]);
            let refused = String::from_utf8_lossy(&out.stderr).contains("user name is empty");
            if out.status.success() || refused {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "server not ready:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_stdin(args, "")
    }

    pub fn ctl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        let (endpoint, ctl_tls) = match &self.tls {
            Some((_, ctl)) => (format!("https://{}", self.endpoint()), ctl.clone()),
            None => (self.endpoint(), Vec::new()),
        };
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--endpoints")
            .arg(endpoint)
            .args(ctl_tls)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn corekv client");
        if let Some(mut i) = child.stdin.take() {
            let _ = i.write_all(stdin.as_bytes());
        }
        child.wait_with_output().expect("client output")
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "corekv {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs a verb that must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            !out.status.success(),
            "corekv {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Small segments keep test disks light and exercise segment rotation.
pub const SMALL_WAL: [&str; 2] = ["--wal-segment-bytes", "1048576"];

/// One POST to the JSON gateway with an optional `Authorization` token; "STATUS BODY".
pub fn gateway_post(endpoint: &str, path: &str, token: Option<&str>, body: &str) -> String {
    use std::io::Read;
    let mut c = std::net::TcpStream::connect(endpoint).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: {t}\r\n"));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = c.read_to_string(&mut resp);
    let status = resp.split(' ').nth(1).unwrap_or("").to_string();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    format!("{status} {body}")
}

/// Whether etcdctl runs here; without it a test prints SKIPPED (and fails under
/// COREKV_REQUIRE_ETCD, as CI sets).
pub fn have_etcdctl() -> bool {
    let ok = Command::new("etcdctl")
        .arg("version")
        .env("ETCDCTL_API", "3")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("COREKV_REQUIRE_ETCD").is_err(),
            "etcdctl missing but COREKV_REQUIRE_ETCD is set"
        );
        eprintln!("SKIPPED: apt-get install etcd-client");
    }
    ok
}

pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not json ({e}): {s}"))
}
pub mod certs;
pub mod cluster;
