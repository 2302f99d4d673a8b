//! `corekv watch KEY [END] [--prefix] [--rev N] [--prev-kv]`: streams events in
//! etcdctl's format until interrupted or canceled by the server.

use super::output::{header_json, kv_json, Format};
use crate::actors::watch::WatchSpec;
use crate::client::Client;
use crate::error::KvError;
use crate::model::{prefix_end, EventKind, WatchResponse};
use clap::Args;
use futures::StreamExt;
use serde_json::json;
use std::io::Write;

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    pub key: String,
    pub range_end: Option<String>,
    /// Watch on a prefix.
    #[arg(long)]
    pub prefix: bool,
    /// Revision to start watching from.
    #[arg(long, default_value_t = 0)]
    pub rev: i64,
    /// Get the previous key-value pair before the event happens.
    #[arg(long)]
    pub prev_kv: bool,
    /// Get periodic watch progress notification from server.
    #[arg(long)]
    pub progress_notify: bool,
}

/// Exit status etcdctl uses when the server cancels a watch.
pub const EXIT_INTERRUPTED: i32 = 5;

fn spec(a: &WatchArgs) -> Result<WatchSpec, KvError> {
    if a.prefix && a.range_end.is_some() {
        return Err(KvError::Client(
            "`range_end` and `--prefix` are mutually exclusive".into(),
        ));
    }
    let key = a.key.as_bytes().to_vec();
    let range_end = match (&a.range_end, a.prefix) {
        (Some(e), _) => e.as_bytes().to_vec(),
        (None, true) => prefix_end(&key),
        (None, false) => Vec::new(),
    };
    Ok(WatchSpec {
        key,
        range_end,
        start_rev: a.rev,
        prev_kv: a.prev_kv,
        progress_notify: a.progress_notify,
        ..Default::default()
    })
}

fn render(f: Format, resp: &WatchResponse) -> String {
    let mut out = String::new();
    if f == Format::Json {
        let events: Vec<_> = resp
            .events
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                if e.kind == EventKind::Delete {
                    m.insert("type".into(), json!(1));
                }
                m.insert("kv".into(), kv_json(&e.kv));
                if let Some(p) = &e.prev_kv {
                    m.insert("prev_kv".into(), kv_json(p));
                }
                serde_json::Value::Object(m)
            })
            .collect();
        let v = json!({
            "Header": header_json(&resp.header),
            "Events": events,
            "CompactRevision": resp.compact_revision,
            "Canceled": resp.canceled,
            "Created": resp.created,
        });
        out.push_str(&format!("{v}\n"));
        return out;
    }
    for e in &resp.events {
        out.push_str(match e.kind {
            EventKind::Put => "PUT\n",
            EventKind::Delete => "DELETE\n",
        });
        for kv in e.prev_kv.iter().chain(std::iter::once(&e.kv)) {
            out.push_str(&String::from_utf8_lossy(&kv.key));
            out.push('\n');
            out.push_str(&String::from_utf8_lossy(&kv.value));
            out.push('\n');
        }
    }
    out
}

/// Prints events as they arrive. Returns when the server cancels the watch (as etcdctl:
/// an error, exit status 5).
pub async fn run(c: &Client, f: Format, a: &WatchArgs) -> Result<String, KvError> {
    let mut w = c.watch(&spec(a)?);
    // Bounded by the server: the stream ends when the watch is canceled.
    while let Some(resp) = w.rx.next().await {
        if resp.created && !resp.canceled {
            continue;
        }
        if resp.canceled {
            let reason = if resp.compact_revision != 0 {
                KvError::Compacted.to_string()
            } else {
                resp.cancel_reason.clone()
            };
            eprintln!("watch was canceled ({reason})");
            break;
        }
        if resp.events.is_empty() && f != Format::Json {
            println!("progress notify: {}", resp.header.revision);
            continue;
        }
        print!("{}", render(f, &resp));
        let _ = std::io::stdout().flush();
    }
    Err(KvError::Client("watch is canceled by the server".into()))
}
