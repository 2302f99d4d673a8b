//! `corekv lease grant|revoke|timetolive|list|keep-alive`, printed as etcdctl prints them.

use super::output::{b64, header_json, no_table, Format};
use crate::client::Client;
use crate::error::KvError;
use crate::model::Header;
use clap::Subcommand;
use serde_json::{json, Map, Value};

#[derive(Subcommand, Debug, Clone)]
pub enum LeaseCmd {
    /// Creates leases.
    Grant {
        /// TTL in seconds.
        ttl: i64,
    },
    /// Revokes leases.
    Revoke { id: String },
    /// Get lease information.
    Timetolive {
        id: String,
        /// Get keys attached to this lease.
        #[arg(long)]
        keys: bool,
    },
    /// List all active leases.
    List,
    /// Keeps leases alive (renew).
    KeepAlive {
        id: String,
        /// Resets the keep-alive time to its original value and exits immediately.
        #[arg(long)]
        once: bool,
    },
}

pub fn parse_id(s: &str) -> Result<i64, KvError> {
    u64::from_str_radix(s, 16)
        .map(|v| v as i64)
        .map_err(|e| KvError::Client(format!("bad lease ID arg ({e}), expecting ID in Hex")))
}

/// etcd's flattened header fields followed by `extra` (clientv3 embeds the header).
fn flat(h: &Header, extra: Vec<(&str, Value)>) -> String {
    let mut m = match header_json(h) {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    for (k, v) in extra {
        m.insert(k.to_string(), v);
    }
    format!("{}\n", Value::Object(m))
}

pub async fn run(c: &Client, f: Format, cmd: &LeaseCmd) -> Result<String, KvError> {
    if f == Format::Table {
        return Err(no_table());
    }
    let json = f == Format::Json;
    match cmd {
        LeaseCmd::Grant { ttl } => {
            let (h, id, ttl) = c
                .lease_grant(0, *ttl)
                .await
                .map_err(|e| KvError::Client(format!("failed to grant lease ({e})")))?;
            Ok(if json {
                flat(
                    &h,
                    vec![("ID", json!(id)), ("TTL", json!(ttl)), ("Error", json!(""))],
                )
            } else {
                format!("lease {:016x} granted with TTL({ttl}s)\n", id as u64)
            })
        }
        LeaseCmd::Revoke { id } => {
            let id = parse_id(id)?;
            let h = c
                .lease_revoke(id)
                .await
                .map_err(|e| KvError::Client(format!("failed to revoke lease ({e})")))?;
            Ok(if json {
                format!("{}\n", json!({ "header": header_json(&h) }))
            } else {
                format!("lease {:016x} revoked\n", id as u64)
            })
        }
        LeaseCmd::Timetolive { id, keys } => {
            let (h, t) = c.lease_time_to_live(parse_id(id)?, *keys).await?;
            if json {
                let keys = if t.keys.is_empty() {
                    Value::Null
                } else {
                    json!(t.keys.iter().map(|k| b64(k)).collect::<Vec<_>>())
                };
                return Ok(flat(
                    &h,
                    vec![
                        ("id", json!(t.id)),
                        ("ttl", json!(t.ttl_secs)),
                        ("granted-ttl", json!(t.granted_ttl_secs)),
                        ("keys", keys),
                    ],
                ));
            }
            let id = t.id as u64;
            if t.granted_ttl_secs == 0 && t.ttl_secs == -1 {
                return Ok(format!("lease {id:016x} already expired\n"));
            }
            let mut out = format!(
                "lease {id:016x} granted with TTL({}s), remaining({}s)",
                t.granted_ttl_secs, t.ttl_secs
            );
            if *keys {
                let names: Vec<String> = t
                    .keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(k).into_owned())
                    .collect();
                out.push_str(&format!(", attached keys([{}])", names.join(" ")));
            }
            out.push('\n');
            Ok(out)
        }
        LeaseCmd::List => {
            let (h, ids) = c.lease_list().await?;
            if json {
                let leases: Vec<Value> = ids.iter().map(|id| json!({ "id": id })).collect();
                return Ok(flat(&h, vec![("leases", json!(leases))]));
            }
            let mut out = format!("found {} leases\n", ids.len());
            for id in ids {
                out.push_str(&format!("{:016x}\n", id as u64));
            }
            Ok(out)
        }
        LeaseCmd::KeepAlive { id, once } => keep_alive(c, json, parse_id(id)?, *once).await,
    }
}

fn keepalive_line(json: bool, h: &Header, id: i64, ttl: i64) -> String {
    if json {
        flat(h, vec![("ID", json!(id)), ("TTL", json!(ttl))])
    } else {
        format!("lease {:016x} keepalived with TTL({ttl})\n", id as u64)
    }
}

/// Renews every TTL/3 seconds (as clientv3) and prints each renewal as it happens,
/// until the lease is gone.
async fn keep_alive(c: &Client, json: bool, id: i64, once: bool) -> Result<String, KvError> {
    use std::io::Write;
    let (h, ttl) = c.lease_keepalive(id).await?;
    if ttl <= 0 {
        if once {
            return Err(KvError::LeaseNotFound);
        }
        return Ok(format!("lease {:016x} expired or revoked.\n", id as u64));
    }
    let line = keepalive_line(json, &h, id, ttl);
    if once {
        return Ok(line);
    }
    print!("{line}");
    let _ = std::io::stdout().flush();
    let mut ttl = ttl;
    let mut last_ok = std::time::Instant::now();
    // Bounded by the lease's life: ends when it expires or is revoked.
    loop {
        glommio::timer::sleep(std::time::Duration::from_secs((ttl / 3).max(1) as u64)).await;
        // Leader changes fail a keepalive or two: retry (as clientv3 does) until the
        // lease would have expired since the last renewal.
        let (h, t) = loop {
            match c.lease_keepalive(id).await {
                Ok(r) => break r,
                Err(e) if last_ok.elapsed() < std::time::Duration::from_secs(ttl as u64) => {
                    tracing::debug!("keepalive failed, retrying: {e}");
                    glommio::timer::sleep(std::time::Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        last_ok = std::time::Instant::now();
        if t <= 0 {
            return Ok(if json {
                String::new()
            } else {
                format!("lease {:016x} expired or revoked.\n", id as u64)
            });
        }
        ttl = t;
        print!("{}", keepalive_line(json, &h, id, ttl));
        let _ = std::io::stdout().flush();
    }
}
