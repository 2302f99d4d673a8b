//! Multi-member clusters of real `corekv serve` processes, each on its own loopback
//! address 127.0.0.N (so nftables rules between addresses can partition them).

use super::{free_port, BIN};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    pub name: String,
    pub ip: String,
    pub native_port: u16,
    pub grpc_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// Flags of the first start (the cluster's); restarts reuse them.
    pub args: Vec<String>,
}

impl Node {
    pub fn peer_url(&self) -> String {
        format!("http://{}:{}", self.ip, self.peer_port)
    }

    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.native_port)
    }

    pub fn grpc_endpoint(&self) -> String {
        format!("{}:{}", self.ip, self.grpc_port)
    }

    pub fn start(&mut self) {
        if !self.is_running() {
            self.child = None; // reaped: it exited by itself
        }
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(BIN)
            .arg("serve")
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn corekv serve");
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a corekv client verb against this member.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .arg("--endpoints")
            .arg(self.endpoint())
            .stdin(Stdio::null())
            .output()
            .expect("spawn corekv client")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "{}: corekv {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// (member id, is leader, raft term) from `endpoint status`, None if unreachable.
    pub fn status(&self) -> Option<(String, bool, u64)> {
        let out = self.ctl(&["endpoint", "status"]);
        if !out.status.success() {
            return None;
        }
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        let f: Vec<&str> = line.trim().split(", ").collect();
        Some((
            f.get(1)?.to_string(),
            *f.get(4)? == "true",
            f.get(6)?.parse().ok()?,
        ))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub token: String,
}

impl Cluster {
    /// Starts `n` members on 127.0.0.{first_ip}.. with `extra` flags each and waits
    /// until every member serves a linearizable read.
    pub fn start(dir: &Path, first_ip: u8, n: usize, extra: &[&str]) -> Cluster {
        let mut c = Cluster::define(dir, first_ip, n, extra);
        for node in c.nodes.iter_mut() {
            node.start();
        }
        for i in 0..n {
            c.wait_ready(i);
        }
        c
    }

    /// Members configured but not started.
    pub fn define(dir: &Path, first_ip: u8, n: usize, extra: &[&str]) -> Cluster {
        let token = format!("test-{}", free_port());
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let name = format!("n{}", i + 1);
                Node {
                    ip: format!("127.0.0.{}", first_ip as usize + i),
                    native_port: free_port(),
                    grpc_port: free_port(),
                    peer_port: free_port(),
                    data_dir: dir.join(&name),
                    log: dir.join(format!("{name}.log")),
                    name,
                    child: None,
                    args: Vec::new(),
                }
            })
            .collect();
        let initial = nodes
            .iter()
            .map(|n| format!("{}={}", n.name, n.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        for node in nodes.iter_mut() {
            node.args = node_args(node, &initial, &token, "new", extra);
        }
        Cluster { nodes, token }
    }

    pub fn wait_ready(&mut self, i: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let node = &mut self.nodes[i];
            assert!(
                node.is_running(),
                "{} exited:\n{}",
                node.name,
                node.log_text()
            );
            if node.ctl(&["get", "readiness-probe"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} not ready:\n{}",
            self.nodes[i].name,
            self.nodes[i].log_text()
        );
    }

    /// Index of the member every running member agrees leads (waits up to `timeout`).
    pub fn leader(&mut self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let mut leaders = Vec::new();
            let mut all = true;
            for (i, n) in self.nodes.iter_mut().enumerate() {
                if !n.is_running() {
                    continue;
                }
                match n.status() {
                    Some((_, true, _)) => leaders.push(i),
                    Some(_) => {}
                    None => all = false,
                }
            }
            if all && leaders.len() == 1 {
                return Some(leaders[0]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.endpoint()).collect()
    }
}

pub fn node_args(
    node: &Node,
    initial: &str,
    token: &str,
    state: &str,
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--name".into(),
        node.name.clone(),
        "--data-dir".into(),
        node.data_dir.display().to_string(),
        "--listen-peer-urls".into(),
        node.peer_url(),
        "--initial-advertise-peer-urls".into(),
        node.peer_url(),
        "--initial-cluster".into(),
        initial.into(),
        "--initial-cluster-token".into(),
        token.into(),
        "--initial-cluster-state".into(),
        state.into(),
        "--listen-client-urls".into(),
        format!("http://{}", node.grpc_endpoint()),
        "--advertise-client-urls".into(),
        format!("http://{}", node.grpc_endpoint()),
        "--listen-native-urls".into(),
        format!("http://{}", node.endpoint()),
        "--wal-segment-bytes".into(),
        "1048576".into(),
        "--cores".into(),
        "1".into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// True (after printing a SKIPPED line) when nftables cannot be used here: no `nft`
/// binary, or no permission to list tables. Under COREKV_REQUIRE_ETCD (CI) that fails.
pub fn nft_unusable(test: &str) -> bool {
    let usable = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        assert!(
            std::env::var("COREKV_REQUIRE_ETCD").is_err(),
            "nft unusable but COREKV_REQUIRE_ETCD is set"
        );
        eprintln!("SKIPPED {test}: needs nftables as root (apt-get install nftables)");
    }
    !usable
}

/// nftables rules dropping traffic between loopback addresses; removed on drop.
pub struct Partition {
    table: String,
}

impl Partition {
    /// Cuts every address in `side` off from every address in `rest`, both ways.
    pub fn new(name: &str, side: &[&str], rest: &[&str]) -> Partition {
        let table = format!("corekv_{name}");
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &table])
            .output();
        let mut script = format!(
            "add table inet {table}\nadd chain inet {table} out {{ type filter hook output priority 0; policy accept; }}\n"
        );
        for a in side {
            for b in rest {
                script += &format!("add rule inet {table} out ip saddr {a} ip daddr {b} drop\n");
                script += &format!("add rule inet {table} out ip saddr {b} ip daddr {a} drop\n");
            }
        }
        let mut child = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (apt-get install nftables)");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("nft script");
        assert!(child.wait().expect("nft").success(), "nft failed");
        Partition { table }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}
