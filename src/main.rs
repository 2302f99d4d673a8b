//! `corekv`: the server (`corekv serve`) and etcdctl-shaped client verbs in one binary.

use clap::{Parser, Subcommand};
use corekv::cli::lease::LeaseCmd;
use corekv::cli::watch::{WatchArgs, EXIT_INTERRUPTED};
use corekv::cli::{self, output::Format, AlarmCmd, DelArgs, EndpointCmd, GetArgs, PutArgs};
use corekv::client::{block_on, Client};
use corekv::config::ServeConfig;
use corekv::error::KvError;

#[derive(Parser)]
#[command(
    name = "corekv",
    version,
    about = "etcd-compatible key-value store (server and client)"
)]
struct Cli {
    /// Native endpoints (comma-separated host:port or URLs).
    #[arg(
        long,
        global = true,
        env = "COREKV_ENDPOINTS",
        default_value = "127.0.0.1:2378"
    )]
    endpoints: String,
    /// Output format: simple, json or table.
    #[arg(
        short = 'w',
        long = "write-out",
        global = true,
        default_value = "simple"
    )]
    write_out: Format,
    /// Username[:password] for authentication (as etcdctl's --user).
    #[arg(long, global = true, env = "COREKV_USER")]
    user: Option<String>,
    /// Password for authentication (then --user holds only the name).
    #[arg(long, global = true, env = "COREKV_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Verify the servers' certificates with this CA bundle (etcdctl's --cacert).
    #[arg(long, global = true, env = "COREKV_CACERT")]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate for TLS (etcdctl's --cert).
    #[arg(long, global = true, env = "COREKV_CERT")]
    cert: Option<std::path::PathBuf>,
    /// Key of --cert (etcdctl's --key).
    #[arg(long = "key", global = true, env = "COREKV_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// Accept any server certificate (insecure; etcdctl's --insecure-skip-tls-verify).
    #[arg(long, global = true, env = "COREKV_INSECURE_SKIP_TLS_VERIFY", num_args = 0..=1, default_missing_value = "true", default_value = "false", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    insecure_skip_tls_verify: bool,
    /// Plaintext for endpoints without a scheme unless TLS flags are given (etcdctl's
    /// --insecure-transport; `https://` endpoints always use TLS, `http://` never).
    #[arg(long, global = true, env = "COREKV_INSECURE_TRANSPORT", num_args = 0..=1, default_missing_value = "true", default_value = "true", value_parser = clap::builder::BoolishValueParser::new(), action = clap::ArgAction::Set)]
    insecure_transport: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

impl Cli {
    /// etcdctl's rules: TLS for `https://` endpoints, and for bare host:port endpoints
    /// when a TLS flag is given or --insecure-transport=false.
    fn client_tls(&self) -> Result<(), KvError> {
        let flags = self.cacert.is_some() || self.cert.is_some() || self.tls_key.is_some();
        let https = corekv::cluster::url_list(&self.endpoints)
            .iter()
            .any(|u| u.starts_with("https://"));
        if !(flags || https || !self.insecure_transport || self.insecure_skip_tls_verify) {
            return Ok(());
        }
        let cfg = corekv::tls::client_config(
            self.cacert.as_deref(),
            self.cert.as_deref(),
            self.tls_key.as_deref(),
            self.insecure_skip_tls_verify,
        )
        .map_err(KvError::Client)?;
        corekv::client::set_tls(cfg, flags || !self.insecure_transport);
        Ok(())
    }
}

/// etcdctl's rules: `--user name:password`, or `--user name --password pw`.
fn credentials(
    user: Option<String>,
    password: Option<String>,
) -> Result<Option<(String, String)>, KvError> {
    let Some(user) = user else {
        return match password {
            Some(_) => Err(KvError::Client("--password needs --user".into())),
            None => Ok(None),
        };
    };
    let (name, password) = match (user.split_once(':'), password) {
        (Some(_), Some(_)) => {
            return Err(KvError::Client(
                "--user holds a password and --password is given: use one".into(),
            ))
        }
        (Some((name, pw)), None) => (name.to_string(), pw.to_string()),
        (None, Some(pw)) => (user, pw),
        (None, None) => {
            return Err(KvError::Client(
                "no password: give --user name:password or --password".into(),
            ))
        }
    };
    if name.is_empty() {
        return Err(KvError::Client("--user: empty user name".into()));
    }
    Ok(Some((name, password)))
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs the server.
    Serve(Box<ServeConfig>),
    /// Puts the given key into the store.
    Put(PutArgs),
    /// Gets the key or a range of keys.
    Get(GetArgs),
    /// Removes the specified key or range of keys [key, range_end).
    Del(DelArgs),
    /// Txn processes all the requests in one transaction (read from standard input).
    Txn {
        /// Input the transaction in interactive mode (prompts are not printed).
        #[arg(short, long)]
        interactive: bool,
    },
    /// Compacts the event history in etcd.
    Compact {
        revision: i64,
        /// Wait for the compaction to physically remove all old revisions.
        #[arg(long)]
        physical: bool,
    },
    /// Membership related commands.
    #[command(subcommand)]
    Member(cli::member::MemberCmd),
    /// Transfers leadership to another member (ID in hex).
    MoveLeader { transferee: String },
    /// Endpoint related commands.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Alarm related commands.
    #[command(subcommand)]
    Alarm(AlarmCmd),
    /// Lease related commands.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Watches events stream on keys or prefixes.
    Watch(WatchArgs),
    /// Defragments each endpoint's store online, or a stopped member's data dir with
    /// `--data-dir` (as `etcdctl defrag --data-dir`).
    Defrag {
        /// Data directory of a member that is not running (offline mode).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// Manages snapshots (save one with `etcdctl snapshot save` over the gRPC port).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Acquires a named lock (runs the command while holding it, if one is given).
    Lock {
        lockname: String,
        /// Timeout for session (seconds).
        #[arg(long, default_value_t = 10)]
        ttl: i64,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Observes and participates in leader election.
    Elect {
        election_name: String,
        proposal: Option<String>,
        /// Observe leader election.
        #[arg(short, long)]
        listen: bool,
        /// Timeout for session (seconds).
        #[arg(long, default_value_t = 60)]
        ttl: i64,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Prints a saved snapshot's hash, revision, total keys and total size.
    Status { file: std::path::PathBuf },
    /// Restores a saved snapshot into a new data dir; the first `corekv serve` on it
    /// bootstraps a new cluster from its flags around the restored keyspace.
    Restore {
        file: std::path::PathBuf,
        /// Data directory to create (must not exist).
        #[arg(long, default_value = "default.corekv")]
        data_dir: std::path::PathBuf,
        /// Accept a copy without the trailing SHA-256 etcd's snapshot stream ends with.
        #[arg(long)]
        skip_hash_check: bool,
    },
}

fn defrag_offline(dir: &std::path::Path) -> Result<String, KvError> {
    let db = dir.join("member").join("db");
    if !db.join("data.mdb").exists() {
        return Err(KvError::Client(format!(
            "no corekv data in {:?}",
            dir.display().to_string()
        )));
    }
    let _lock = corekv::server::lock_member_dir(dir).map_err(KvError::Client)?;
    let (before, after) = corekv::storage::backend::defragment_offline(&db)?;
    tracing::info!(before, after, "defragmented");
    Ok(format!(
        "Finished defragmenting etcd data[{}]\n",
        dir.display()
    ))
}

fn snapshot_restore(
    file: &std::path::Path,
    data_dir: &std::path::Path,
    skip_hash_check: bool,
) -> Result<String, KvError> {
    if data_dir.exists() {
        return Err(KvError::Client(format!(
            "data-dir {:?} exists",
            data_dir.display().to_string()
        )));
    }
    let db = data_dir.join("member").join("db");
    let restored = corekv::storage::snapshot::restore(file, &db, skip_hash_check);
    match restored {
        Ok(r) => Ok(format!(
            "restored snapshot {} into {} (revision {}, {} keys); start it with corekv serve --data-dir {} and the new cluster's flags\n",
            file.display(),
            data_dir.display(),
            r.revision,
            r.keys,
            data_dir.display()
        )),
        Err(e) => {
            // Nothing half-made is left for a later serve to trip over.
            let _ = std::fs::remove_dir_all(data_dir);
            Err(KvError::Client(e))
        }
    }
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("COREKV_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("corekv={level}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() {
    corekv::config::import_etcd_env();
    let cli = Cli::parse();
    let endpoints = cli.endpoints.clone();
    let format = cli.write_out;
    // Client verbs only: a server's own connections (forwarding to the leader) never
    // act as a user, whatever the environment holds.
    if !matches!(cli.cmd, Cmd::Serve(_)) {
        if let Err(e) = cli.client_tls() {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
        match credentials(cli.user.clone(), cli.password.clone()) {
            Ok(Some((user, password))) => corekv::client::set_credentials(user, password),
            Ok(None) => {}
            Err(e) => {
                eprintln!("Error: {e}");
                std::process::exit(1);
            }
        }
    }
    let result: Result<String, KvError> = match cli.cmd {
        Cmd::Serve(cfg) => {
            init_logging(&cfg.log_level);
            match corekv::server::run(*cfg) {
                Ok(()) => std::process::exit(0),
                Err(e) => {
                    eprintln!("corekv: {e}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::Txn { .. } => {
            let mut input = String::new();
            match std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                Ok(_) => run(endpoints.clone(), move |c| async move {
                    cli::txn(&c, format, &input).await
                }),
                Err(e) => Err(KvError::Client(format!("read stdin: {e}"))),
            }
        }
        Cmd::Put(a) => {
            // Read a missing value from stdin before entering the executor.
            match cli::put_request(&a) {
                Ok(req) => {
                    let a = PutArgs {
                        value: Some(String::from_utf8_lossy(&req.value).into_owned()),
                        ..a
                    };
                    run(
                        endpoints,
                        move |c| async move { cli::put(&c, format, &a).await },
                    )
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Get(a) => run(
            endpoints,
            move |c| async move { cli::get(&c, format, &a).await },
        ),
        Cmd::Del(a) => run(
            endpoints,
            move |c| async move { cli::del(&c, format, &a).await },
        ),
        Cmd::Compact { revision, physical } => run(endpoints, move |c| async move {
            cli::compact(&c, format, revision, physical).await
        }),
        Cmd::Endpoint(EndpointCmd::Status { cluster }) => {
            let eps = endpoints.clone();
            block_on(move || async move { cli::endpoint_status(&eps, format, cluster).await })
                .unwrap_or_else(|e| Err(KvError::Client(e)))
        }
        Cmd::Endpoint(EndpointCmd::Hashkv { cluster, rev }) => {
            let eps = endpoints.clone();
            block_on(move || async move { cli::endpoint_hashkv(&eps, format, cluster, rev).await })
                .unwrap_or_else(|e| Err(KvError::Client(e)))
        }
        Cmd::Endpoint(EndpointCmd::Health { cluster }) => {
            let eps = endpoints.clone();
            let checked = block_on(move || async move {
                let list = cli::endpoint_list(&eps, cluster).await?;
                Ok::<_, KvError>(cli::member::endpoint_health(&list).await)
            })
            .unwrap_or_else(|e| Err(KvError::Client(e)));
            match checked {
                Ok((out, true)) => Ok(out),
                Ok((out, false)) => {
                    eprint!("{out}");
                    Err(KvError::Client("unhealthy cluster".into()))
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Defrag { data_dir: None } => {
            let eps = endpoints.clone();
            block_on(move || async move { cli::defrag_online(&eps).await })
                .unwrap_or_else(|e| Err(KvError::Client(e)))
        }
        Cmd::Defrag {
            data_dir: Some(dir),
        } => defrag_offline(&dir),
        Cmd::Snapshot(SnapshotCmd::Status { file }) => corekv::storage::snapshot::status(&file)
            .map_err(KvError::Client)
            .and_then(|st| cli::output::snapshot_status(format, &st)),
        Cmd::Snapshot(SnapshotCmd::Restore {
            file,
            data_dir,
            skip_hash_check,
        }) => snapshot_restore(&file, &data_dir, skip_hash_check),
        Cmd::Member(cmd) => run(endpoints, move |c| async move {
            cli::member::run(&c, format, &cmd).await
        }),
        Cmd::MoveLeader { transferee } => {
            let eps = endpoints.clone();
            block_on(move || async move { cli::member::move_leader(&eps, &transferee).await })
                .unwrap_or_else(|e| Err(KvError::Client(e)))
        }
        Cmd::Alarm(cmd) => run(endpoints, move |c| async move {
            cli::alarm(&c, format, &cmd).await
        }),
        Cmd::Lease(cmd) => run(endpoints, move |c| async move {
            cli::lease::run(&c, format, &cmd).await
        }),
        Cmd::Watch(a) => {
            match run(endpoints, move |c| async move {
                cli::watch::run(&c, format, &a).await
            }) {
                Ok(out) => Ok(out),
                Err(e) => {
                    eprintln!("Error: {e}");
                    std::process::exit(EXIT_INTERRUPTED);
                }
            }
        }
        Cmd::Lock {
            lockname,
            ttl,
            command,
        } => exit_with(run_status(endpoints, move |c| async move {
            cli::concurrency::lock(c, &lockname, ttl, &command).await
        })),
        Cmd::Elect {
            election_name,
            proposal,
            listen,
            ttl,
        } => exit_with(run_status(endpoints, move |c| async move {
            match (listen, proposal) {
                (true, _) => cli::concurrency::observe(c, &election_name).await,
                (false, Some(p)) => cli::concurrency::elect(c, &election_name, &p, ttl).await,
                (false, None) => Err(KvError::Client(
                    "no proposal argument but -l not set".into(),
                )),
            }
        })),
    };
    match result {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
    }
}

/// Connects to the endpoints and runs one verb on a client executor.
fn run<F, Fut>(endpoints: String, f: F) -> Result<String, KvError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<String, KvError>> + 'static,
{
    block_on(move || async move {
        let c = Client::connect(&endpoints).await?;
        f(c).await
    })
    .unwrap_or_else(|e| Err(KvError::Client(e)))
}

/// Like `run`, for verbs whose result is an exit status.
fn run_status<F, Fut>(endpoints: String, f: F) -> Result<i32, KvError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<i32, KvError>> + 'static,
{
    block_on(move || async move {
        let c = Client::connect(&endpoints).await?;
        f(c).await
    })
    .unwrap_or_else(|e| Err(KvError::Client(e)))
}

fn exit_with(r: Result<i32, KvError>) -> ! {
    match r {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("Error: {e}");
            std::process::exit(1);
        }
    }
}

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
