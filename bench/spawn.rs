//! `--spawn 1|3`: fresh etcd and corekv deployments on loopback, started and stopped by
//! the tool. Children die with the tool (PR_SET_PDEATHSIG) even if it is killed; on a
//! normal end or Ctrl-C they are killed and their data directories removed in `Drop`.

use crate::record::{Place, Target};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct SpawnArgs {
    /// corekv binary (default: `corekv` beside this binary).
    #[arg(long)]
    pub corekv_bin: Option<PathBuf>,
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: String,
    /// Extra `corekv serve` flags, space-separated (3 members default to "--cores 1":
    /// six shards on two cores fight over them).
    #[arg(long, allow_hyphen_values = true)]
    pub corekv_args: Option<String>,
    /// Extra etcd flags, space-separated.
    #[arg(long, allow_hyphen_values = true)]
    pub etcd_args: Option<String>,
    /// Where data directories go (default: the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Serve clients over TLS with --client-cert-auth, etcd and corekv alike (one CA and
    /// server certificate made at start, the loader's client certificate from it); peers
    /// stay plaintext.
    #[arg(long)]
    pub tls: bool,
}

impl SpawnArgs {
    pub fn corekv_flags(&self, members: u8) -> String {
        match &self.corekv_args {
            Some(a) => a.clone(),
            None if members > 1 => "--cores 1".into(),
            None => String::new(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum System {
    Etcd,
    Corekv,
}

/// Member startup budget: etcd elects within ~1 s, corekv within its election timeout.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Deployment {
    pub system: System,
    pub grpc: Vec<String>,
    pub native: Vec<String>,
    pub flags: String,
    children: Vec<Child>,
    dir: PathBuf,
}

/// Listen ports are drawn below Linux's ephemeral range (32768-60999 by default): a port
/// the kernel hands out for bind(0) can be handed out again for an outgoing connection
/// (the loader's, a spawned member's) before the server binds it, which made a spawned
/// server fail with "address already in use".
const PORT_RANGE: std::ops::Range<u16> = 20000..32000;

/// Ports this process already gave out (two members must not draw the same one).
static TAKEN_PORTS: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

fn free_port() -> Result<u16, String> {
    use std::hash::{BuildHasher, Hasher};
    let mut taken = TAKEN_PORTS.lock().map_err(|e| e.to_string())?;
    let span = (PORT_RANGE.end - PORT_RANGE.start) as u64;
    // Bounded: a few hundred draws find a free port unless the range is nearly full.
    for attempt in 0..512u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(attempt);
        let port = PORT_RANGE.start + (h.finish() % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.push(port);
            return Ok(port);
        }
    }
    Err(format!("no free port in {PORT_RANGE:?} after 512 tries"))
}

impl Deployment {
    pub fn start(system: System, members: u8, args: &SpawnArgs) -> Result<Deployment, String> {
        assert!((1..=3).contains(&members), "clap bounds --spawn");
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = match system {
            System::Etcd => "etcd",
            System::Corekv => "corekv",
        };
        let dir = args
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir)
            .join(format!(
                "corekv-bench-{}-{name}-{stamp}",
                std::process::id()
            ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let flags = match system {
            System::Etcd => args.etcd_args.clone().unwrap_or_default(),
            System::Corekv => args.corekv_flags(members),
        };
        let mut d = Deployment {
            system,
            grpc: Vec::new(),
            native: Vec::new(),
            flags,
            children: Vec::new(),
            dir,
        };
        let scheme = if args.tls { "https" } else { "http" };
        let tls_flags: Vec<String> = if args.tls {
            let work = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
            let c = crate::tls::spawn_certs(&work)?;
            let path = |p: &std::path::Path| p.display().to_string();
            vec![
                "--cert-file".into(),
                path(&c.server_cert),
                "--key-file".into(),
                path(&c.server_key),
                "--trusted-ca-file".into(),
                path(&c.ca),
                "--client-cert-auth".into(),
            ]
        } else {
            Vec::new()
        };
        let mut peers = Vec::new();
        for i in 0..members {
            peers.push((format!("{name}{}", i + 1), free_port()?));
        }
        let cluster: Vec<String> = peers
            .iter()
            .map(|(n, p)| format!("{n}=http://127.0.0.1:{p}"))
            .collect();
        let cluster = cluster.join(",");
        for (member, peer_port) in &peers {
            let client = format!("127.0.0.1:{}", free_port()?);
            let peer = format!("http://127.0.0.1:{peer_port}");
            let data = d.dir.join(member);
            let mut cmd = match system {
                System::Etcd => Command::new(&args.etcd_bin),
                System::Corekv => Command::new(corekv_bin(args)?),
            };
            if system == System::Corekv {
                cmd.arg("serve");
                let native = format!("127.0.0.1:{}", free_port()?);
                cmd.args(["--listen-native-urls", &format!("{scheme}://{native}")]);
                // Plaintext endpoints stay host:port; https ones carry their scheme.
                d.native.push(if args.tls {
                    format!("https://{native}")
                } else {
                    native
                });
            }
            cmd.args(["--name", member])
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen-client-urls", &format!("{scheme}://{client}")])
                .args(["--advertise-client-urls", &format!("{scheme}://{client}")])
                .args(&tls_flags)
                .args(["--listen-peer-urls", &peer])
                .args(["--initial-advertise-peer-urls", &peer])
                .args(["--initial-cluster", &cluster])
                .args(d.flags.split_whitespace());
            let log = std::fs::File::create(d.dir.join(format!("{member}.log")))
                .map_err(|e| e.to_string())?;
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd
                .spawn()
                .map_err(|e| format!("start {name} ({:?}): {e}", cmd.get_program()))?;
            d.children.push(child);
            d.grpc.push(if args.tls {
                format!("https://{client}")
            } else {
                client
            });
        }
        // The harness test reads this line to check that every process goes away.
        eprintln!(
            "spawned {name}: pids {:?}, data in {}",
            d.pids(),
            d.dir.display()
        );
        d.wait_ready()?;
        d.leader_first()?;
        assert_eq!(d.grpc.len(), members as usize);
        Ok(d)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// How the load generator reaches `target` on this deployment.
    pub fn place(&self, target: Target) -> Place {
        assert_eq!(target.system(), self.system);
        Place {
            target,
            endpoints: if target.is_native() {
                self.native.join(",")
            } else {
                self.grpc.join(",")
            },
            pids: self.pids(),
            native_status: self.native.clone(),
            etcd_metrics: if self.system == System::Etcd {
                self.grpc.clone()
            } else {
                Vec::new()
            },
        }
    }

    /// Every member accepts a put (a leader is elected and known to all).
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let rt = crate::tokio_runtime()?;
        for (i, ep) in self.grpc.clone().iter().enumerate() {
            let mut last_err = String::new();
            loop {
                if let Ok(Some(status)) = self.children[i].try_wait() {
                    return Err(format!(
                        "{:?} member {} exited ({status}): {}",
                        self.system,
                        i + 1,
                        self.log_tail(i)
                    ));
                }
                let url = crate::grpc_url_n(ep, 0);
                let ok = rt.block_on(async {
                    let ch = match crate::grpc_channel(&url).await {
                        Ok(ch) => ch,
                        Err(e) => {
                            last_err = e;
                            return false;
                        }
                    };
                    let mut kv = corekv::etcdpb::etcdserverpb::kv_client::KvClient::new(ch);
                    let put = corekv::etcdpb::etcdserverpb::PutRequest {
                        key: b"corekv-bench-probe".to_vec(),
                        value: b"ready".to_vec(),
                        ..Default::default()
                    };
                    match tokio::time::timeout(Duration::from_secs(2), kv.put(put)).await {
                        Ok(Ok(_)) => true,
                        Ok(Err(e)) => {
                            last_err = e.to_string();
                            false
                        }
                        Err(_) => {
                            last_err = "put timed out".into();
                            false
                        }
                    }
                });
                if ok {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{:?} member {} not ready after {READY_TIMEOUT:?} ({last_err}): {}",
                        self.system,
                        i + 1,
                        self.log_tail(i)
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// Puts the leader's endpoints first, for etcd and corekv alike: one-connection
    /// workloads use the first endpoint, and whether that member leads or forwards to
    /// the leader would otherwise decide the comparison (etcd's published figures name
    /// the leader too). Several connections still go round robin over every member.
    fn leader_first(&mut self) -> Result<(), String> {
        if self.grpc.len() < 2 {
            return Ok(());
        }
        let rt = crate::tokio_runtime()?;
        // Bounded: one status per member, each with a timeout.
        let mut leader_at = None;
        for (i, ep) in self.grpc.iter().enumerate() {
            let url = crate::grpc_url_n(ep, 0);
            let status = rt.block_on(async {
                let ch = crate::grpc_channel(&url).await?;
                let mut m =
                    corekv::etcdpb::etcdserverpb::maintenance_client::MaintenanceClient::new(ch);
                let req = corekv::etcdpb::etcdserverpb::StatusRequest {};
                match tokio::time::timeout(Duration::from_secs(2), m.status(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(e)) => Err(format!("status of {url}: {e}")),
                    Err(_) => Err(format!("status of {url}: timed out")),
                }
            })?;
            let me = status.header.map_or(0, |h| h.member_id);
            if me != 0 && me == status.leader {
                leader_at = Some(i);
                break;
            }
        }
        let i = leader_at.ok_or_else(|| format!("{:?}: no member says it leads", self.system))?;
        self.grpc.rotate_left(i);
        if !self.native.is_empty() {
            self.native.rotate_left(i);
        }
        assert!(i < self.children.len(), "found among the members");
        Ok(())
    }

    fn log_tail(&self, i: usize) -> String {
        let prefix = match self.system {
            System::Etcd => "etcd",
            System::Corekv => "corekv",
        };
        let path = self.dir.join(format!("{prefix}{}.log", i + 1));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn corekv_bin(args: &SpawnArgs) -> Result<PathBuf, String> {
    if let Some(p) = &args.corekv_bin {
        return Ok(p.clone());
    }
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin = me.with_file_name("corekv");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release) or pass --corekv-bin",
            bin.display()
        ))
    }
}
