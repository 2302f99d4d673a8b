//! `corekv lock NAME [command ...]` and `corekv elect NAME [PROPOSAL]` / `elect -l NAME`,
//! as etcdctl runs them: a session lease kept alive in the background, the lock or
//! leadership held until the command exits or the process is interrupted.

use crate::client::Client;
use crate::error::KvError;
use futures::StreamExt;
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Waits (checking every 100 ms) until SIGINT or SIGTERM arrives.
async fn interrupted() {
    while !INTERRUPTED.load(Ordering::SeqCst) {
        glommio::timer::sleep(Duration::from_millis(100)).await;
    }
}

/// A session: a lease renewed every TTL/3 seconds until dropped.
struct Session {
    lease: i64,
    _keepalive: glommio::Task<()>,
}

impl Session {
    async fn new(c: &Rc<Client>, ttl_secs: i64) -> Result<Session, KvError> {
        let (_, lease, ttl) = c.lease_grant(0, ttl_secs).await?;
        let client = c.clone();
        let keepalive = glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(Duration::from_secs((ttl / 3).max(1) as u64)).await;
                match client.lease_keepalive(lease).await {
                    Ok((_, t)) if t > 0 => {}
                    _ => {
                        eprintln!("session expired");
                        return;
                    }
                }
            }
        });
        Ok(Session {
            lease,
            _keepalive: keepalive,
        })
    }
}

fn kv_lines(key: &[u8], value: &[u8]) -> String {
    format!(
        "{}\n{}\n",
        String::from_utf8_lossy(key),
        String::from_utf8_lossy(value)
    )
}

/// Acquires the lock; runs `command` while holding it (exit status passed through), or
/// prints the key and holds the lock until interrupted.
pub async fn lock(
    c: Client,
    name: &str,
    ttl_secs: i64,
    command: &[String],
) -> Result<i32, KvError> {
    catch_interrupts();
    let c = Rc::new(c);
    let session = Session::new(&c, ttl_secs).await?;
    let (h, key) = c.lock(name.as_bytes(), session.lease).await?;
    let status = if let Some((prog, args)) = command.split_first() {
        let mut cmd = std::process::Command::new(prog);
        cmd.args(args)
            .env("ETCD_LOCK_KEY", String::from_utf8_lossy(&key).into_owned())
            .env("ETCD_LOCK_REV", h.revision.to_string());
        let run = glommio::executor()
            .spawn_blocking(move || cmd.status())
            .await
            .map_err(|e| KvError::Client(format!("{prog}: {e}")))?;
        run.code().unwrap_or(1)
    } else {
        print!("{}", String::from_utf8_lossy(&key));
        println!();
        let _ = std::io::stdout().flush();
        interrupted().await;
        0
    };
    c.unlock(&key).await?;
    let _ = c.lease_revoke(session.lease).await;
    Ok(status)
}

/// Campaigns with `proposal`, prints the leader once elected, and resigns when
/// interrupted.
pub async fn elect(c: Client, name: &str, proposal: &str, ttl_secs: i64) -> Result<i32, KvError> {
    catch_interrupts();
    let c = Rc::new(c);
    let session = Session::new(&c, ttl_secs).await?;
    let (_, leader) = c
        .campaign(name.as_bytes(), session.lease, proposal.as_bytes())
        .await?;
    let (_, kv) = c.leader(name.as_bytes()).await?;
    print!("{}", kv_lines(&kv.key, &kv.value));
    let _ = std::io::stdout().flush();
    interrupted().await;
    c.resign(&leader).await?;
    let _ = c.lease_revoke(session.lease).await;
    Ok(0)
}

/// Prints each leader (and each new value it proclaims) until interrupted.
pub async fn observe(c: Client, name: &str) -> Result<i32, KvError> {
    catch_interrupts();
    let mut w = c.observe(name.as_bytes());
    let stop = glommio::spawn_local(interrupted());
    futures::pin_mut!(stop);
    loop {
        match futures::future::select(w.rx.next(), &mut stop).await {
            futures::future::Either::Left((Some(resp), _)) => {
                for e in resp.events {
                    print!("{}", kv_lines(&e.kv.key, &e.kv.value));
                }
                let _ = std::io::stdout().flush();
            }
            futures::future::Either::Left((None, _)) => {
                return Err(KvError::Client("observe stopped by the server".into()))
            }
            futures::future::Either::Right(_) => return Ok(0),
        }
    }
}
