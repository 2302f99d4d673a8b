//! etcdctl's output formats: simple, json (protobuf field names, zero values omitted,
//! bytes in base64) and table (only where etcdctl has one).

use crate::actors::network::alarm_name;
use crate::error::KvError;
use crate::model::*;
use base64::Engine;
use serde_json::{json, Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Simple,
    Json,
    Table,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "simple" => Ok(Format::Simple),
            "json" => Ok(Format::Json),
            "table" => Ok(Format::Table),
            other => Err(format!("unsupported output format {other:?}")),
        }
    }
}

pub(crate) fn no_table() -> KvError {
    KvError::Client("table not supported as output format".into())
}

pub(crate) fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Inserts `v` unless it is a zero value (Go's `omitempty`).
fn put_nz(m: &mut Map<String, Value>, k: &str, v: Value) {
    let zero = match &v {
        Value::Number(n) => n.as_i64() == Some(0) || n.as_u64() == Some(0),
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Null => true,
        Value::Object(_) => false,
    };
    if !zero {
        m.insert(k.into(), v);
    }
}

pub(crate) fn header_json(h: &Header) -> Value {
    let mut m = Map::new();
    put_nz(&mut m, "cluster_id", json!(h.cluster_id));
    put_nz(&mut m, "member_id", json!(h.member_id));
    put_nz(&mut m, "revision", json!(h.revision));
    put_nz(&mut m, "raft_term", json!(h.raft_term));
    Value::Object(m)
}

pub(crate) fn kv_json(kv: &KeyValue) -> Value {
    let mut m = Map::new();
    put_nz(&mut m, "key", json!(b64(&kv.key)));
    put_nz(&mut m, "create_revision", json!(kv.create_revision));
    put_nz(&mut m, "mod_revision", json!(kv.mod_revision));
    put_nz(&mut m, "version", json!(kv.version));
    put_nz(&mut m, "value", json!(b64(&kv.value)));
    put_nz(&mut m, "lease", json!(kv.lease));
    Value::Object(m)
}

fn range_json(h: Value, r: &RangeResponse) -> Value {
    let mut m = Map::new();
    m.insert("header".into(), h);
    put_nz(
        &mut m,
        "kvs",
        Value::Array(r.kvs.iter().map(kv_json).collect()),
    );
    put_nz(&mut m, "more", json!(r.more));
    put_nz(&mut m, "count", json!(r.count));
    Value::Object(m)
}

fn put_json(h: Value, r: &PutResponse) -> Value {
    let mut m = Map::new();
    m.insert("header".into(), h);
    if let Some(kv) = &r.prev_kv {
        m.insert("prev_kv".into(), kv_json(kv));
    }
    Value::Object(m)
}

fn del_json(h: Value, r: &DeleteRangeResponse) -> Value {
    let mut m = Map::new();
    m.insert("header".into(), h);
    put_nz(&mut m, "deleted", json!(r.deleted));
    put_nz(
        &mut m,
        "prev_kvs",
        Value::Array(r.prev_kvs.iter().map(kv_json).collect()),
    );
    Value::Object(m)
}

fn txn_json(h: Value, r: &TxnResponse) -> Value {
    let mut m = Map::new();
    m.insert("header".into(), h);
    put_nz(&mut m, "succeeded", json!(r.succeeded));
    let ops: Vec<Value> = r
        .responses
        .iter()
        .zip(&r.op_revisions)
        .map(|(op, rev)| {
            // Nested headers carry only the revision as of that op, as etcd's do.
            let nested = || json!({ "revision": rev });
            let (name, v) = match op {
                ResponseOp::Range(x) => ("ResponseRange", range_json(nested(), x)),
                ResponseOp::Put(x) => ("ResponsePut", put_json(nested(), x)),
                ResponseOp::DeleteRange(x) => ("ResponseDeleteRange", del_json(nested(), x)),
                ResponseOp::Txn(x) => ("ResponseTxn", txn_json(nested(), x)),
            };
            json!({ "Response": { name: v } })
        })
        .collect();
    put_nz(&mut m, "responses", Value::Array(ops));
    Value::Object(m)
}

fn line(out: &mut String, s: &[u8]) {
    out.push_str(&String::from_utf8_lossy(s));
    out.push('\n');
}

fn simple_kvs(out: &mut String, kvs: &[KeyValue], value_only: bool) {
    for kv in kvs {
        if !value_only {
            line(out, &kv.key);
        }
        line(out, &kv.value);
    }
}

pub fn put(f: Format, h: &Header, r: &PutResponse) -> String {
    match f {
        Format::Json => put_json(header_json(h), r).to_string() + "\n",
        _ => {
            let mut out = "OK\n".to_string();
            if let Some(kv) = &r.prev_kv {
                simple_kvs(&mut out, std::slice::from_ref(kv), false);
            }
            out
        }
    }
}

pub fn get(f: Format, h: &Header, r: &RangeResponse, value_only: bool) -> Result<String, KvError> {
    match f {
        Format::Json => Ok(range_json(header_json(h), r).to_string() + "\n"),
        Format::Table => Err(no_table()),
        Format::Simple => {
            let mut out = String::new();
            simple_kvs(&mut out, &r.kvs, value_only);
            if r.kvs.is_empty() && r.count > 0 {
                out.push_str(&format!("{}\n", r.count)); // --count-only
            }
            Ok(out)
        }
    }
}

pub fn del(f: Format, h: &Header, r: &DeleteRangeResponse) -> String {
    match f {
        Format::Json => del_json(header_json(h), r).to_string() + "\n",
        _ => {
            let mut out = format!("{}\n", r.deleted);
            simple_kvs(&mut out, &r.prev_kvs, false);
            out
        }
    }
}

pub fn txn(f: Format, h: &Header, r: &TxnResponse) -> Result<String, KvError> {
    match f {
        Format::Json => Ok(txn_json(header_json(h), r).to_string() + "\n"),
        Format::Table => Err(no_table()),
        Format::Simple => {
            let mut out = String::from(if r.succeeded {
                "SUCCESS\n"
            } else {
                "FAILURE\n"
            });
            for op in &r.responses {
                out.push('\n');
                match op {
                    ResponseOp::Range(x) => simple_kvs(&mut out, &x.kvs, false),
                    ResponseOp::Put(x) => out.push_str(&put(Format::Simple, h, x)),
                    ResponseOp::DeleteRange(x) => out.push_str(&del(Format::Simple, h, x)),
                    ResponseOp::Txn(x) => out.push_str(&txn(Format::Simple, h, x)?),
                }
            }
            Ok(out)
        }
    }
}

pub fn compact(f: Format, h: &Header, rev: i64) -> String {
    match f {
        Format::Json => json!({ "header": header_json(h) }).to_string() + "\n",
        _ => format!("compacted revision {rev}\n"),
    }
}

/// go-humanize's Bytes (SI units), as etcdctl prints DB sizes.
pub fn human_bytes(n: u64) -> String {
    if n < 10 {
        return format!("{n} B");
    }
    let units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let e = ((n as f64).ln() / 1000f64.ln()).floor() as usize;
    let e = e.min(units.len() - 1);
    let val = ((n as f64) / 1000f64.powi(e as i32) * 10.0 + 0.5).floor() / 10.0;
    if val < 10.0 {
        format!("{val:.1} {}", units[e])
    } else {
        format!("{val:.0} {}", units[e])
    }
}

pub fn endpoint_status(f: Format, rows: &[(String, Header, Status)]) -> Result<String, KvError> {
    let cells = |(ep, h, st): &(String, Header, Status)| -> Vec<String> {
        vec![
            ep.clone(),
            format!("{:x}", h.member_id),
            st.version.clone(),
            human_bytes(st.db_size as u64),
            (st.leader == h.member_id).to_string(),
            st.is_learner.to_string(),
            st.raft_term.to_string(),
            st.raft_index.to_string(),
            st.raft_applied_index.to_string(),
            st.errors.join(", "),
        ]
    };
    match f {
        Format::Simple => Ok(rows.iter().map(|r| cells(r).join(", ") + "\n").collect()),
        Format::Json => {
            let list: Vec<Value> = rows
                .iter()
                .map(|(ep, h, st)| {
                    let mut m = Map::new();
                    m.insert("header".into(), header_json(h));
                    put_nz(&mut m, "version", json!(st.version));
                    put_nz(&mut m, "dbSize", json!(st.db_size));
                    put_nz(&mut m, "leader", json!(st.leader));
                    put_nz(&mut m, "raftIndex", json!(st.raft_index));
                    put_nz(&mut m, "raftTerm", json!(st.raft_term));
                    put_nz(&mut m, "raftAppliedIndex", json!(st.raft_applied_index));
                    put_nz(&mut m, "errors", json!(st.errors));
                    put_nz(&mut m, "dbSizeInUse", json!(st.db_size_in_use));
                    put_nz(&mut m, "isLearner", json!(st.is_learner));
                    // corekv extension: group-commit evidence.
                    m.insert(
                        "wal".into(),
                        json!({
                            "batches": st.wal.batches,
                            "entries": st.wal.entries,
                            "maxBatch": st.wal.max_batch,
                            "fsyncP50Micros": st.wal.fsync_p50_us,
                            "fsyncP99Micros": st.wal.fsync_p99_us,
                        }),
                    );
                    json!({ "Endpoint": ep, "Status": Value::Object(m) })
                })
                .collect();
            Ok(Value::Array(list).to_string() + "\n")
        }
        Format::Table => {
            let header: Vec<String> = [
                "ENDPOINT",
                "ID",
                "VERSION",
                "DB SIZE",
                "IS LEADER",
                "IS LEARNER",
                "RAFT TERM",
                "RAFT INDEX",
                "RAFT APPLIED INDEX",
                "ERRORS",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let body: Vec<Vec<String>> = rows.iter().map(cells).collect();
            Ok(table(&header, &body))
        }
    }
}

/// `snapshot status` as etcdctl prints it (hash in hex in the simple and table forms).
pub fn snapshot_status(
    f: Format,
    st: &crate::storage::snapshot::FileStatus,
) -> Result<String, KvError> {
    let cells = vec![
        format!("{:x}", st.hash),
        st.revision.to_string(),
        st.total_keys.to_string(),
        human_bytes(st.total_size),
    ];
    match f {
        Format::Simple => Ok(cells.join(", ") + "\n"),
        Format::Json => Ok(json!({
            "hash": st.hash, "revision": st.revision,
            "totalKey": st.total_keys, "totalSize": st.total_size,
        })
        .to_string()
            + "\n"),
        Format::Table => {
            let header: Vec<String> = ["HASH", "REVISION", "TOTAL KEYS", "TOTAL SIZE"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            Ok(table(&header, &[cells]))
        }
    }
}

/// `endpoint hashkv` as etcdctl prints it.
pub fn endpoint_hashkv(f: Format, rows: &[(String, Header, u32, i64)]) -> Result<String, KvError> {
    match f {
        Format::Simple => Ok(rows
            .iter()
            .map(|(ep, _, hash, _)| format!("{ep}, {hash}\n"))
            .collect()),
        Format::Json => {
            let list: Vec<Value> = rows
                .iter()
                .map(|(ep, h, hash, compact)| {
                    let mut m = Map::new();
                    m.insert("header".into(), header_json(h));
                    put_nz(&mut m, "hash", json!(hash));
                    put_nz(&mut m, "compact_revision", json!(compact));
                    json!({ "Endpoint": ep, "HashKV": Value::Object(m) })
                })
                .collect();
            Ok(Value::Array(list).to_string() + "\n")
        }
        Format::Table => {
            let header = vec!["ENDPOINT".to_string(), "HASH".to_string()];
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|(ep, _, hash, _)| vec![ep.clone(), hash.to_string()])
                .collect();
            Ok(table(&header, &body))
        }
    }
}

/// tablewriter's layout as etcdctl uses it: centred header, right-aligned cells.
pub fn table(header: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let sep = widths
        .iter()
        .map(|w| "-".repeat(w + 2))
        .collect::<Vec<_>>()
        .join("+");
    let sep = format!("+{sep}+\n");
    let mut out = sep.clone();
    out.push('|');
    for (h, w) in header.iter().zip(&widths) {
        let pad = w - h.chars().count();
        let left = pad / 2 + pad % 2;
        out.push_str(&format!(
            " {}{}{} |",
            " ".repeat(left),
            h,
            " ".repeat(pad - left)
        ));
    }
    out.push('\n');
    out.push_str(&sep);
    for r in rows {
        out.push('|');
        for (c, w) in r.iter().zip(&widths) {
            out.push_str(&format!(" {c:>w$} |", w = *w));
        }
        out.push('\n');
    }
    out.push_str(&sep);
    out
}

pub fn alarms(f: Format, h: &Header, alarms: &[AlarmMember]) -> Result<String, KvError> {
    match f {
        Format::Simple => Ok(alarms
            .iter()
            .map(|a| format!("memberID:{} alarm:{} \n", a.member_id, alarm_name(a.alarm)))
            .collect()),
        Format::Json => {
            let list: Vec<Value> = alarms
                .iter()
                .map(|a| json!({ "memberID": a.member_id, "alarm": a.alarm as i32 }))
                .collect();
            let mut m = Map::new();
            m.insert("header".into(), header_json(h));
            put_nz(&mut m, "alarms", Value::Array(list));
            Ok(Value::Object(m).to_string() + "\n")
        }
        Format::Table => Err(no_table()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humanized_sizes_match_go_humanize() {
        assert_eq!(human_bytes(24576), "25 kB");
        assert_eq!(human_bytes(2_500_000), "2.5 MB");
        assert_eq!(human_bytes(5), "5 B");
    }
}
