//! `corekv serve` flags. Each reads `COREKV_<FLAG>`; flags that etcd also has read
//! `ETCD_<FLAG>` too (so an etcd.conf env file works). A flag beats either env var.

use clap::Args;
use std::path::PathBuf;

/// Flags with etcd's names: their `ETCD_*` variables are honoured.
pub const ETCD_FLAGS: &[&str] = &[
    "name",
    "data-dir",
    "wal-dir",
    "snapshot-count",
    "quota-backend-bytes",
    "max-request-bytes",
    "max-txn-ops",
    "log-level",
    "heartbeat-interval",
    "election-timeout",
    "initial-cluster-token",
    "initial-advertise-peer-urls",
    "initial-cluster",
    "initial-cluster-state",
    "listen-peer-urls",
    "discovery-srv",
    "listen-client-urls",
    "advertise-client-urls",
    "auth-token",
    "auth-token-ttl",
    "bcrypt-cost",
    // TLS (src/tls.rs)
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "client-cert-auth",
    "client-crl-file",
    "auto-tls",
    "cipher-suites",
    "tls-min-version",
    "tls-max-version",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "peer-client-cert-auth",
    "peer-crl-file",
    "peer-auto-tls",
    "peer-cert-allowed-cn",
    "peer-cert-allowed-hostname",
    "client-cert-allowed-hostname",
    "experimental-peer-skip-client-san-verification",
    "grpc-keepalive-interval",
    "grpc-keepalive-timeout",
    "grpc-keepalive-min-time",
    "max-concurrent-streams",
];

/// etcd flags whose corekv flag has another name: (etcd's, corekv's).
const ETCD_RENAMED: &[(&str, &str)] = &[
    (
        "experimental-watch-progress-notify-interval",
        "watch-progress-notify-interval",
    ),
    (
        "experimental-lease-checkpoint-interval",
        "lease-checkpoint-interval",
    ),
];

fn env_name(prefix: &str, flag: &str) -> String {
    format!("{prefix}_{}", flag.to_uppercase().replace('-', "_"))
}

/// `ETCD_*` variables in the environment that name no flag corekv implements (etcd
/// warns about its unrecognized ones the same way); the server logs each at start-up.
pub fn unknown_etcd_env() -> Vec<String> {
    let known: Vec<String> = ETCD_FLAGS
        .iter()
        .chain(ETCD_RENAMED.iter().map(|(etcd, _)| etcd))
        .map(|f| env_name("ETCD", f))
        .collect();
    let mut out: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("ETCD_") && !known.contains(k))
        .collect();
    out.sort();
    out
}

/// Copies `ETCD_X` to `COREKV_X` where only the former is set, before clap reads env.
pub fn import_etcd_env() {
    let pairs = ETCD_FLAGS
        .iter()
        .map(|f| (*f, *f))
        .chain(ETCD_RENAMED.iter().copied());
    for (etcd, corekv) in pairs {
        let ours = env_name("COREKV", corekv);
        if std::env::var_os(&ours).is_none() {
            if let Some(v) = std::env::var_os(env_name("ETCD", etcd)) {
                // SAFETY: called at start-up before any other thread exists.
                unsafe { std::env::set_var(&ours, v) };
            }
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ServeConfig {
    /// Human-readable name for this member.
    #[arg(long, env = "COREKV_NAME", default_value = "default")]
    pub name: String,
    /// Path to the data directory.
    #[arg(long, env = "COREKV_DATA_DIR", default_value = "default.corekv")]
    pub data_dir: PathBuf,
    /// Path to the dedicated WAL directory (default: <data-dir>/member/wal).
    #[arg(long, env = "COREKV_WAL_DIR")]
    pub wal_dir: Option<PathBuf>,
    /// URLs to serve the native capnp-rpc protocol on (comma-separated; scheme optional).
    #[arg(
        long,
        env = "COREKV_LISTEN_NATIVE_URLS",
        default_value = "http://127.0.0.1:2378"
    )]
    pub listen_native_urls: String,
    /// URLs to serve etcd's v3 gRPC API on (comma-separated; scheme optional).
    #[arg(
        long,
        env = "COREKV_LISTEN_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client_urls: String,
    /// This member's client URLs as reported to clients (member list).
    #[arg(
        long,
        env = "COREKV_ADVERTISE_CLIENT_URLS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub advertise_client_urls: String,
    /// Applied entries between LMDB checkpoints (after which the WAL below is released).
    #[arg(long, env = "COREKV_SNAPSHOT_COUNT", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_count: u64,
    /// Raise the NOSPACE alarm when the backend grows past this many bytes.
    #[arg(long, env = "COREKV_QUOTA_BACKEND_BYTES", default_value_t = 2 * 1024 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub quota_backend_bytes: u64,
    /// Maximum client request size in bytes.
    #[arg(long, env = "COREKV_MAX_REQUEST_BYTES", default_value_t = 1_572_864, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_bytes: u64,
    /// Server-to-client HTTP/2 ping interval on gRPC connections, e.g. 2h, 30s (0 disables).
    #[arg(long, env = "COREKV_GRPC_KEEPALIVE_INTERVAL", default_value = "2h", value_parser = parse_duration)]
    pub grpc_keepalive_interval: std::time::Duration,
    /// How long a ping may go unanswered before the connection is closed.
    #[arg(long, env = "COREKV_GRPC_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_positive_duration)]
    pub grpc_keepalive_timeout: std::time::Duration,
    /// etcd's minimum interval between client pings. Accepted for etcd configurations but
    /// not enforced: the HTTP/2 server answers every ping (README, differences).
    #[arg(long, env = "COREKV_GRPC_KEEPALIVE_MIN_TIME", default_value = "5s", value_parser = parse_positive_duration)]
    pub grpc_keepalive_min_time: std::time::Duration,
    /// Auth token type: only etcd's default `simple` tokens are built (jwt is refused).
    #[arg(long, env = "COREKV_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,
    /// Seconds a simple token lives without use.
    #[arg(long, env = "COREKV_AUTH_TOKEN_TTL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_token_ttl: u64,
    /// bcrypt cost for hashing user passwords (etcd's range 4..=31).
    #[arg(long, env = "COREKV_BCRYPT_COST", default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,
    /// Maximum concurrent gRPC streams per client connection.
    #[arg(long, env = "COREKV_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,
    /// Maximum operations per txn branch.
    #[arg(long, env = "COREKV_MAX_TXN_OPS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_txn_ops: u64,
    /// Shards (pinned executors); default: every core this process may run on.
    #[arg(long, env = "COREKV_CORES", value_parser = clap::value_parser!(u64).range(1..1025))]
    pub cores: Option<u64>,
    /// Shard that runs the raft actor.
    #[arg(long, env = "COREKV_RAFT_SHARD", default_value_t = 0)]
    pub raft_shard: usize,
    /// Shard that runs the WAL actor.
    #[arg(long, env = "COREKV_WAL_SHARD", default_value_t = 0)]
    pub wal_shard: usize,
    /// Shard that runs the apply actor.
    #[arg(long, env = "COREKV_APPLY_SHARD", default_value_t = 0)]
    pub apply_shard: usize,
    /// debug, info, warn or error.
    #[arg(long, env = "COREKV_LOG_LEVEL", default_value = "info", value_parser = ["debug", "info", "warn", "error"])]
    pub log_level: String,
    /// Raft heartbeat interval (ms).
    #[arg(long, env = "COREKV_HEARTBEAT_INTERVAL", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval: u64,
    /// Raft election timeout (ms): at least 5x the heartbeat, at most 50000.
    #[arg(long, env = "COREKV_ELECTION_TIMEOUT", default_value_t = 1000)]
    pub election_timeout: u64,
    /// Cluster token (member and cluster IDs derive from it, as in etcd).
    #[arg(
        long,
        env = "COREKV_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,
    /// This member's peer URLs (comma-separated).
    #[arg(
        long,
        env = "COREKV_INITIAL_ADVERTISE_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub initial_advertise_peer_urls: String,
    /// URLs to listen on for peer (raft) traffic (comma-separated).
    #[arg(
        long,
        env = "COREKV_LISTEN_PEER_URLS",
        default_value = "http://localhost:2380"
    )]
    pub listen_peer_urls: String,
    /// Initial cluster configuration for bootstrapping: name=peer-url,... (default: this
    /// member alone, `<name>=<initial-advertise-peer-urls>`). Ignored once the data dir
    /// holds a member.
    #[arg(long, env = "COREKV_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// `new` to bootstrap a new cluster, `existing` to join one (after `member add`).
    #[arg(long, env = "COREKV_INITIAL_CLUSTER_STATE", default_value = "new", value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
    /// DNS domain whose `_etcd-server._tcp` SRV records list the initial cluster.
    #[arg(long, env = "COREKV_DISCOVERY_SRV", conflicts_with = "initial_cluster")]
    pub discovery_srv: Option<String>,
    /// DNS server (ip:port) for --discovery-srv instead of the system resolver
    /// (a corekv extension; etcd always uses the system's).
    #[arg(long, env = "COREKV_DISCOVERY_DNS_SERVER")]
    pub discovery_dns_server: Option<String>,
    /// Promote a learner to voter once its log is within this many entries of the
    /// leader's (0 = never; etcd has no such option).
    #[arg(long, env = "COREKV_AUTO_PROMOTE_LEARNERS", default_value_t = 0)]
    pub auto_promote_learners: u64,
    /// How WAL batches are made durable: `dsync` (segments opened O_DSYNC: each batch's
    /// write is durable when it completes, one I/O) or `fdatasync` (write, then
    /// fdatasync). Both sync once per group-commit batch.
    #[arg(long, env = "COREKV_WAL_SYNC", default_value = "dsync", value_parser = ["dsync", "fdatasync"])]
    pub wal_sync: String,
    /// Microseconds an idle shard polls before parking (0 = park at once). Trades CPU
    /// for wake-up latency; off by default because servers share machines.
    #[arg(long, env = "COREKV_SPIN_BEFORE_PARK_US", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub spin_before_park_us: u64,
    /// Interval of progress notifications to watchers that ask for them (etcd's
    /// --experimental-watch-progress-notify-interval), e.g. 10m, 30s, 500ms.
    #[arg(long, alias = "experimental-watch-progress-notify-interval", env = "COREKV_WATCH_PROGRESS_NOTIFY_INTERVAL", default_value = "10m", value_parser = parse_positive_duration)]
    pub watch_progress_notify_interval: std::time::Duration,
    /// How often the leader records leases' remaining TTLs through raft, so a restart or
    /// a new leader does not reset them (etcd's --experimental-lease-checkpoint-interval).
    #[arg(long, alias = "experimental-lease-checkpoint-interval", env = "COREKV_LEASE_CHECKPOINT_INTERVAL", default_value = "5m", value_parser = parse_positive_duration)]
    pub lease_checkpoint_interval: std::time::Duration,
    /// Client TLS: certificate of the client URLs (gRPC, gateway, native port).
    #[arg(long, env = "COREKV_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// Client TLS: key of --cert-file.
    #[arg(long, env = "COREKV_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Client TLS: CA that signs the client certificates accepted with --client-cert-auth.
    #[arg(long, env = "COREKV_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Require client certificates signed by --trusted-ca-file on https client URLs (with
    /// auth enabled, the certificate's CN is the user).
    #[arg(long, env = "COREKV_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub client_cert_auth: bool,
    /// Accept client certificates valid for this host name only (with --client-cert-auth).
    #[arg(long, env = "COREKV_CLIENT_CERT_ALLOWED_HOSTNAME")]
    pub client_cert_allowed_hostname: Option<String>,
    /// A member's peer certificate need not be valid for its peer URL's host (it must
    /// still be signed by --peer-trusted-ca-file).
    #[arg(long, env = "COREKV_EXPERIMENTAL_PEER_SKIP_CLIENT_SAN_VERIFICATION", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub experimental_peer_skip_client_san_verification: bool,
    /// Client TLS: certificate revocation list (PEM or DER), re-read when it changes.
    #[arg(long, env = "COREKV_CLIENT_CRL_FILE")]
    pub client_crl_file: Option<PathBuf>,
    /// Client TLS with a generated self-signed certificate (kept in <data-dir>/fixtures).
    #[arg(long, env = "COREKV_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub auto_tls: bool,
    /// TLS 1.2 cipher suites by Go's names, comma-separated (default: all rustls has).
    #[arg(long, env = "COREKV_CIPHER_SUITES")]
    pub cipher_suites: Option<String>,
    /// Minimum TLS version: TLS1.2 (default) or TLS1.3.
    #[arg(long, env = "COREKV_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,
    /// Maximum TLS version: TLS1.2 or TLS1.3 (default: the highest).
    #[arg(long, env = "COREKV_TLS_MAX_VERSION", default_value = "")]
    pub tls_max_version: String,
    /// Peer TLS: certificate of the peer URLs (also the client certificate peers dial with).
    #[arg(long, env = "COREKV_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// Peer TLS: key of --peer-cert-file.
    #[arg(long, env = "COREKV_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// Peer TLS: CA that signs every member's peer certificate.
    #[arg(long, env = "COREKV_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// Require peers' certificates signed by --peer-trusted-ca-file.
    #[arg(long, env = "COREKV_PEER_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub peer_client_cert_auth: bool,
    /// Peer TLS: certificate revocation list, re-read when it changes.
    #[arg(long, env = "COREKV_PEER_CRL_FILE")]
    pub peer_crl_file: Option<PathBuf>,
    /// Peer TLS with a generated self-signed certificate (peers are then not verified).
    #[arg(long, env = "COREKV_PEER_AUTO_TLS", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub peer_auto_tls: bool,
    /// Accept peer certificates with this CN only.
    #[arg(long, env = "COREKV_PEER_CERT_ALLOWED_CN")]
    pub peer_cert_allowed_cn: Option<String>,
    /// Accept peer certificates valid for this host name only.
    #[arg(
        long,
        env = "COREKV_PEER_CERT_ALLOWED_HOSTNAME",
        conflicts_with = "peer_cert_allowed_cn"
    )]
    pub peer_cert_allowed_hostname: Option<String>,
    /// WAL segment size in bytes (preallocated and zero-filled).
    #[arg(long, env = "COREKV_WAL_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024, hide = true)]
    pub wal_segment_bytes: u64,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s}: {e}"))
}

fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s}: must be positive"));
    }
    Ok(d)
}

impl ServeConfig {
    /// etcd's minimum lease TTL: 1.5 election timeouts, rounded up to whole seconds.
    pub fn min_lease_ttl_secs(&self) -> i64 {
        (3 * self.election_timeout).div_ceil(2 * 1000).max(1) as i64
    }

    /// Checks cross-flag rules clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(format!(
                "--election-timeout[{}ms] should be at least 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            ));
        }
        if self.election_timeout > 50_000 {
            return Err(format!(
                "--election-timeout[{}ms] is too long, and should be set less than 50 seconds",
                self.election_timeout
            ));
        }
        let shards = self.shards();
        for (flag, v) in [
            ("--raft-shard", self.raft_shard),
            ("--wal-shard", self.wal_shard),
            ("--apply-shard", self.apply_shard),
        ] {
            if v >= shards {
                return Err(format!("{flag} {v} is not below --cores {shards}"));
            }
        }
        if self.wal_segment_bytes < (1 << 20) || !self.wal_segment_bytes.is_multiple_of(4096) {
            return Err("--wal-segment-bytes must be a multiple of 4096 and at least 1 MiB".into());
        }
        if self.auth_token != "simple" {
            let kind = self.auth_token.split(',').next().unwrap_or("");
            return Err(if kind == "jwt" {
                "--auth-token jwt is not supported by corekv (only simple tokens)".into()
            } else {
                format!("unknown token type: {kind}")
            });
        }
        if self.max_request_bytes > 64 << 20 {
            return Err("--max-request-bytes must be at most 64 MiB".into());
        }
        parse_urls(&self.listen_native_urls)?;
        parse_urls(&self.listen_client_urls)?;
        parse_urls(&self.listen_peer_urls)?;
        parse_urls(&self.initial_advertise_peer_urls)?;
        Ok(())
    }

    fn tls_options(&self) -> crate::tls::TlsOptions {
        crate::tls::TlsOptions {
            cipher_suites: self.cipher_suites.clone(),
            min_version: self.tls_min_version.clone(),
            max_version: self.tls_max_version.clone(),
        }
    }

    /// Both TLS sides from the flags, with etcd's refusals: an `https://` URL of a side
    /// without a certificate stops start-up naming the flags; certificates given for a
    /// side whose URLs are all `http://` are logged as ignored for those URLs.
    pub fn server_tls(&self) -> Result<ServerTls, String> {
        let opts = self.tls_options();
        let client_flags = crate::tls::TlsFlags {
            side: "client",
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            trusted_ca_file: self.trusted_ca_file.clone(),
            client_cert_auth: self.client_cert_auth,
            crl_file: self.client_crl_file.clone(),
            auto_tls: self.auto_tls,
            allowed_cn: None,
            allowed_hostname: self.client_cert_allowed_hostname.clone(),
            skip_client_san: false,
        };
        let peer_flags = crate::tls::TlsFlags {
            side: "peer",
            cert_file: self.peer_cert_file.clone(),
            key_file: self.peer_key_file.clone(),
            trusted_ca_file: self.peer_trusted_ca_file.clone(),
            client_cert_auth: self.peer_client_cert_auth,
            crl_file: self.peer_crl_file.clone(),
            auto_tls: self.peer_auto_tls,
            allowed_cn: self.peer_cert_allowed_cn.clone(),
            allowed_hostname: self.peer_cert_allowed_hostname.clone(),
            skip_client_san: self.experimental_peer_skip_client_san_verification,
        };
        let client_urls: Vec<String> = crate::cluster::url_list(&self.listen_client_urls)
            .into_iter()
            .chain(crate::cluster::url_list(&self.listen_native_urls))
            .collect();
        let peer_urls = crate::cluster::url_list(&self.listen_peer_urls);
        let client =
            crate::tls::build_side(&client_flags, &opts, &self.data_dir, &hosts(&client_urls))?;
        let peer = crate::tls::build_side(&peer_flags, &opts, &self.data_dir, &hosts(&peer_urls))?;
        for u in &client_urls {
            let tls = crate::tls::url_is_tls(u)?;
            if tls && client.is_none() {
                return Err(format!(
                    "TLS key/cert (--cert-file, --key-file) must be provided for client url {u} with HTTPS scheme"
                ));
            }
            if !tls && client.is_some() {
                tracing::warn!(url = %u, "scheme is HTTP while key and cert files are present; ignoring key and cert files");
            }
            if !tls && self.client_cert_auth {
                tracing::warn!(url = %u, "scheme is HTTP while --client-cert-auth is enabled; ignoring client cert auth for this URL");
            }
        }
        for u in &peer_urls {
            let tls = crate::tls::url_is_tls(u)?;
            if tls && peer.is_none() {
                return Err(format!(
                    "cannot listen on TLS for {}: KeyFile and CertFile are not presented (--peer-cert-file, --peer-key-file or --peer-auto-tls)",
                    crate::cluster::host_port(u)
                ));
            }
            if !tls && peer.is_some() {
                tracing::warn!(url = %u, "scheme is HTTP while peer key and cert files are present; ignoring key and cert files");
            }
        }
        // Every member this one may dial: an https peer needs peer TLS to be reached.
        let dialed: Vec<String> = crate::cluster::url_list(&self.initial_advertise_peer_urls)
            .into_iter()
            .chain(
                self.initial_cluster
                    .iter()
                    .flat_map(|c| c.split(','))
                    .filter_map(|m| m.split_once('=').map(|(_, u)| u.trim().to_string())),
            )
            .collect();
        for u in &dialed {
            if crate::tls::url_is_tls(u)? && peer.is_none() {
                return Err(format!(
                    "peer URL {u} is https: TLS key/cert (--peer-cert-file, --peer-key-file) or --peer-auto-tls must be provided"
                ));
            }
        }
        for u in crate::cluster::url_list(&self.advertise_client_urls) {
            crate::tls::url_is_tls(&u)?;
        }
        Ok(ServerTls { client, peer })
    }

    pub fn shards(&self) -> usize {
        self.cores
            .map(|c| c as usize)
            .unwrap_or_else(|| available_cpus().len())
    }

    pub fn snap_dir(&self) -> PathBuf {
        self.member_dir().join("snap")
    }

    pub fn member_dir(&self) -> PathBuf {
        self.data_dir.join("member")
    }

    pub fn wal_path(&self) -> PathBuf {
        self.wal_dir
            .clone()
            .unwrap_or_else(|| self.member_dir().join("wal"))
    }

    pub fn db_path(&self) -> PathBuf {
        self.member_dir().join("db")
    }

    /// `--initial-cluster` with its default (this member alone).
    pub fn initial_cluster_spec(&self) -> String {
        match &self.initial_cluster {
            Some(c) => c.clone(),
            None => crate::cluster::url_list(&self.initial_advertise_peer_urls)
                .iter()
                .map(|u| format!("{}={u}", self.name))
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    pub fn advertise_peer_urls(&self) -> Vec<String> {
        crate::cluster::url_list(&self.initial_advertise_peer_urls)
    }

    /// This member's ID as bootstrap derives it (etcd's derivation).
    pub fn member_id(&self) -> u64 {
        crate::cluster::member_id(
            &self.advertise_peer_urls(),
            &self.initial_cluster_token,
            None,
        )
    }
}

/// Both TLS sides of a server (None: that side has no certificate, so only plaintext).
#[derive(Clone, Debug, Default)]
pub struct ServerTls {
    pub client: Option<crate::tls::TlsSide>,
    pub peer: Option<crate::tls::TlsSide>,
}

/// The hosts of `urls` (auto TLS puts them in its certificate).
fn hosts(urls: &[String]) -> Vec<String> {
    let mut out: Vec<String> = urls
        .iter()
        .map(|u| crate::cluster::host_of(u))
        .filter(|h| !h.is_empty() && h != "0.0.0.0" && h != "::")
        .collect();
    out.sort();
    out.dedup();
    out
}

/// "http://127.0.0.1:2378,127.0.0.2:2378" -> socket addresses (scheme optional, as etcd).
pub fn parse_urls(urls: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for u in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let hostport = crate::cluster::host_port(u);
        if hostport.contains('/') || !hostport.contains(':') {
            return Err(format!("invalid URL {u:?}: expected [scheme://]host:port"));
        }
        out.push(hostport);
    }
    if out.is_empty() {
        return Err("no URL given".into());
    }
    Ok(out)
}

/// Listen URLs -> (host:port, TLS) pairs: `https://` is TLS, `http://` or no scheme is
/// plaintext, any other scheme is refused.
pub fn parse_listen_urls(urls: &str) -> Result<Vec<(String, bool)>, String> {
    let addrs = parse_urls(urls)?;
    let list = crate::cluster::url_list(urls);
    assert_eq!(addrs.len(), list.len());
    list.iter()
        .zip(addrs)
        .map(|(u, a)| crate::tls::url_is_tls(u).map(|tls| (a, tls)))
        .collect()
}

/// CPUs in this process's affinity mask.
pub fn available_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
                .filter(|c| libc::CPU_ISSET(*c, &set))
                .collect();
            if !cpus.is_empty() {
                return cpus;
            }
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: ServeConfig,
    }

    #[test]
    fn default_ids_match_etcd() {
        // etcd 3.4 started with defaults reports member 8e9e05c52164694d in cluster cdf818194e3a8c32.
        let t = T::try_parse_from(["x"]).unwrap();
        assert_eq!(format!("{:x}", t.c.member_id()), "8e9e05c52164694d");
        assert_eq!(t.c.initial_cluster_spec(), "default=http://localhost:2380");
    }

    #[test]
    fn urls_parse_with_or_without_scheme() {
        assert_eq!(
            parse_urls("http://127.0.0.1:2378, 127.0.0.2:2378").unwrap(),
            vec!["127.0.0.1:2378", "127.0.0.2:2378"]
        );
        assert!(parse_urls("nonsense").is_err());
    }
}
