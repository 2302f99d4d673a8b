//! etcdctl-shaped client verbs over the native protocol.

pub mod concurrency;
pub mod lease;
pub mod member;
pub mod output;
pub mod txn_parse;
pub mod watch;

use crate::client::Client;
use crate::error::KvError;
use crate::model::*;
use clap::{Args, Subcommand};
use output::Format;

#[derive(Args, Debug, Clone)]
pub struct PutArgs {
    pub key: String,
    /// Value; read from standard input when omitted (as etcdctl).
    pub value: Option<String>,
    /// Return the previous key-value pair.
    #[arg(long)]
    pub prev_kv: bool,
    /// Update the key using its current value.
    #[arg(long)]
    pub ignore_value: bool,
    /// Update the key using its current lease.
    #[arg(long)]
    pub ignore_lease: bool,
    /// Lease ID (hexadecimal) to attach to the key.
    #[arg(long, default_value = "0")]
    pub lease: String,
}

#[derive(Args, Debug, Clone)]
pub struct GetArgs {
    pub key: String,
    pub range_end: Option<String>,
    /// Get keys with matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Get keys that are greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
    /// Specify the kv revision.
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Maximum number of results.
    #[arg(long, default_value_t = 0)]
    pub limit: i64,
    /// Get only the keys.
    #[arg(long)]
    pub keys_only: bool,
    /// Get only the count.
    #[arg(long)]
    pub count_only: bool,
    /// Only write values when using the "simple" output format.
    #[arg(long)]
    pub print_value_only: bool,
    /// Sort target; CREATE, KEY, MODIFY, VALUE, or VERSION.
    #[arg(long, default_value = "")]
    pub sort_by: String,
    /// Order of results; ASCEND or DESCEND.
    #[arg(long, default_value = "")]
    pub order: String,
    /// Linearizable(l) or Serializable(s).
    #[arg(long, default_value = "l")]
    pub consistency: String,
}

#[derive(Args, Debug, Clone)]
pub struct DelArgs {
    pub key: String,
    pub range_end: Option<String>,
    /// Delete keys with matching prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Return deleted key-value pairs.
    #[arg(long)]
    pub prev_kv: bool,
    /// Delete keys that are greater than or equal to the given key.
    #[arg(long)]
    pub from_key: bool,
}

#[derive(Subcommand, Debug, Clone)]
pub enum EndpointCmd {
    /// Prints out the status of endpoints specified in `--endpoints` flag.
    Status {
        /// Use all endpoints from the cluster member list.
        #[arg(long)]
        cluster: bool,
    },
    /// Checks the healthiness of endpoints specified in `--endpoints` flag.
    Health {
        /// Use all endpoints from the cluster member list.
        #[arg(long)]
        cluster: bool,
    },
    /// Prints the KV history hash (etcd's HashKV) of each endpoint.
    Hashkv {
        /// Use all endpoints from the cluster member list.
        #[arg(long)]
        cluster: bool,
        /// Revision to hash up to (0 = current).
        #[arg(long, default_value_t = 0)]
        rev: i64,
    },
}

#[derive(Subcommand, Debug, Clone)]
pub enum AlarmCmd {
    /// Lists all alarms.
    List,
    /// Disarms all alarms.
    Disarm,
}

fn bad_args(msg: String) -> KvError {
    KvError::Client(msg)
}

fn range_end_for(
    key: &str,
    end: &Option<String>,
    prefix: bool,
    from_key: bool,
) -> Result<Vec<u8>, KvError> {
    if prefix && from_key {
        return Err(bad_args(
            "`--prefix` and `--from-key` cannot be set at the same time, choose one".into(),
        ));
    }
    if (prefix || from_key) && end.is_some() {
        return Err(bad_args(
            "too many arguments, only accept one argument when `--prefix` or `--from-key` is set"
                .into(),
        ));
    }
    Ok(if prefix {
        if key.is_empty() {
            vec![0]
        } else {
            prefix_end(key.as_bytes())
        }
    } else if from_key {
        vec![0]
    } else {
        end.as_deref().unwrap_or("").as_bytes().to_vec()
    })
}

pub fn put_request(a: &PutArgs) -> Result<PutRequest, KvError> {
    let value = match &a.value {
        Some(v) => v.clone(),
        None if a.ignore_value => String::new(),
        None => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .map_err(|e| bad_args(format!("read value from stdin: {e}")))?;
            s
        }
    };
    let lease = i64::from_str_radix(&a.lease, 16)
        .map_err(|e| bad_args(format!("bad lease ID ({e}), expecting ID in Hex")))?;
    Ok(PutRequest {
        key: a.key.as_bytes().to_vec(),
        value: value.into_bytes(),
        lease,
        prev_kv: a.prev_kv,
        ignore_value: a.ignore_value,
        ignore_lease: a.ignore_lease,
    })
}

pub fn get_request(a: &GetArgs) -> Result<RangeRequest, KvError> {
    let mut key = a.key.clone();
    if key.is_empty() && (a.from_key || a.prefix) {
        key = "\0".into(); // etcdctl: an empty key with --from-key/--prefix means all keys
    }
    let sort_target = match a.sort_by.to_uppercase().as_str() {
        "" | "KEY" => SortTarget::Key,
        "CREATE" => SortTarget::Create,
        "MODIFY" => SortTarget::Mod,
        "VALUE" => SortTarget::Value,
        "VERSION" => SortTarget::Version,
        other => return Err(bad_args(format!("bad sort target {other:?}"))),
    };
    let mut sort_order = match a.order.to_uppercase().as_str() {
        "" => SortOrder::None,
        "ASCEND" => SortOrder::Ascend,
        "DESCEND" => SortOrder::Descend,
        other => return Err(bad_args(format!("bad sort order {other:?}"))),
    };
    if sort_order == SortOrder::None && !a.sort_by.is_empty() {
        sort_order = SortOrder::Ascend;
    }
    let serializable = match a.consistency.as_str() {
        "l" => false,
        "s" => true,
        other => return Err(bad_args(format!("unknown consistency flag {other:?}"))),
    };
    Ok(RangeRequest {
        range_end: range_end_for(&a.key, &a.range_end, a.prefix, a.from_key)?,
        key: key.into_bytes(),
        limit: a.limit,
        revision: a.rev,
        sort_order,
        sort_target,
        serializable,
        keys_only: a.keys_only,
        count_only: a.count_only,
        ..Default::default()
    })
}

pub fn del_request(a: &DelArgs) -> Result<DeleteRangeRequest, KvError> {
    let mut key = a.key.clone();
    if key.is_empty() && (a.from_key || a.prefix) {
        key = "\0".into();
    }
    Ok(DeleteRangeRequest {
        range_end: range_end_for(&a.key, &a.range_end, a.prefix, a.from_key)?,
        key: key.into_bytes(),
        prev_kv: a.prev_kv,
    })
}

pub async fn put(c: &Client, f: Format, a: &PutArgs) -> Result<String, KvError> {
    let (h, r) = c.put(&put_request(a)?).await?;
    Ok(output::put(f, &h, &r))
}

pub async fn get(c: &Client, f: Format, a: &GetArgs) -> Result<String, KvError> {
    let (h, r) = c.range(&get_request(a)?).await?;
    output::get(f, &h, &r, a.print_value_only)
}

pub async fn del(c: &Client, f: Format, a: &DelArgs) -> Result<String, KvError> {
    let (h, r) = c.delete(&del_request(a)?).await?;
    Ok(output::del(f, &h, &r))
}

pub async fn txn(c: &Client, f: Format, input: &str) -> Result<String, KvError> {
    let req = txn_parse::parse(input)?;
    let (h, r) = c.txn(&req).await?;
    output::txn(f, &h, &r)
}

pub async fn compact(c: &Client, f: Format, rev: i64, physical: bool) -> Result<String, KvError> {
    let h = c.compact(rev, physical).await?;
    Ok(output::compact(f, &h, rev))
}

/// `--endpoints`, or with `--cluster` every member's endpoint from the member list.
pub async fn endpoint_list(endpoints: &str, cluster: bool) -> Result<Vec<String>, KvError> {
    if cluster {
        member::cluster_endpoints(endpoints).await
    } else {
        crate::config::parse_urls(endpoints).map_err(KvError::Client)
    }
}

pub async fn endpoint_status(endpoints: &str, f: Format, cluster: bool) -> Result<String, KvError> {
    let mut rows = Vec::new();
    for ep in endpoint_list(endpoints, cluster).await? {
        let c = Client::connect(&ep).await?;
        let (h, st) = c.status().await?;
        rows.push((ep, h, st));
    }
    output::endpoint_status(f, &rows)
}

pub async fn endpoint_hashkv(
    endpoints: &str,
    f: Format,
    cluster: bool,
    rev: i64,
) -> Result<String, KvError> {
    let mut rows = Vec::new();
    for ep in endpoint_list(endpoints, cluster).await? {
        let c = Client::connect(&ep).await?;
        let (h, hash, compact) = c.hash_kv(rev).await?;
        rows.push((ep, h, hash, compact));
    }
    output::endpoint_hashkv(f, &rows)
}

pub async fn alarm(c: &Client, f: Format, cmd: &AlarmCmd) -> Result<String, KvError> {
    let get = AlarmRequest {
        action: AlarmAction::Get,
        member_id: 0,
        alarm: AlarmType::None,
    };
    let (h, alarms) = c.alarm(&get).await?;
    match cmd {
        AlarmCmd::List => output::alarms(f, &h, &alarms),
        AlarmCmd::Disarm => {
            let mut disarmed = Vec::new();
            let mut header = h;
            for a in alarms {
                let req = AlarmRequest {
                    action: AlarmAction::Deactivate,
                    member_id: a.member_id,
                    alarm: a.alarm,
                };
                let (h2, gone) = c.alarm(&req).await?;
                header = h2;
                disarmed.extend(gone);
            }
            output::alarms(f, &header, &disarmed)
        }
    }
}

/// etcdctl's `defrag`: each endpoint's member defragments its store online.
pub async fn defrag_online(endpoints: &str) -> Result<String, KvError> {
    let addrs = crate::config::parse_urls(endpoints).map_err(KvError::Client)?;
    let mut out = String::new();
    let mut failed = false;
    for ep in addrs {
        let done = match Client::connect(&ep).await {
            Ok(c) => c.defragment().await.map(|_| ()),
            Err(e) => Err(e),
        };
        match done {
            Ok(()) => out.push_str(&format!("Finished defragmenting etcd member[{ep}]\n")),
            Err(e) => {
                eprintln!("Failed to defragment etcd member[{ep}] ({e})");
                failed = true;
            }
        }
    }
    if failed {
        print!("{out}");
        return Err(KvError::Client("defragmentation failed".into()));
    }
    Ok(out)
}
