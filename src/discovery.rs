//! DNS SRV discovery (`--discovery-srv DOMAIN`): the initial cluster from the
//! `_etcd-server._tcp.DOMAIN` records, built as etcd builds it: one member per record,
//! peer URL `http://<target>:<port>`; the record whose address resolves to one of this
//! member's advertised peer URLs gets this member's name, the others are named 0, 1, ...
//! (they name themselves when they start). Member IDs then match etcd's for the same
//! records. Lookups go through hickory-resolver: the system's resolver, or the server
//! given by `--discovery-dns-server` (tests run dnsmasq on loopback).

use hickory_resolver::config::{NameServerConfig, Protocol, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use std::net::SocketAddr;

/// Records looked up per domain at most (bounds the start-up work).
const MAX_RECORDS: usize = 64;

/// Builds an `--initial-cluster` spec from SRV records. Blocking (start-up only).
pub fn initial_cluster_from_srv(
    domain: &str,
    name: &str,
    own_urls: &[String],
    dns_server: Option<&str>,
) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("discovery runtime: {e}"))?;
    rt.block_on(lookup(domain, name, own_urls, dns_server))
}

/// Resolves peer URL host names through `dns_server` (start-up only): the transport
/// then dials these addresses, since the system resolver does not know that server.
pub fn resolve_peer_hosts(
    dns_server: &str,
    urls: &[String],
) -> Result<std::collections::HashMap<String, SocketAddr>, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("discovery runtime: {e}"))?;
    rt.block_on(async {
        let resolver = resolver_for(Some(dns_server))?;
        let mut out = std::collections::HashMap::new();
        for u in urls {
            let hp = crate::cluster::host_port(u);
            let Some((host, port)) = hp.rsplit_once(':') else {
                continue;
            };
            if host.parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            match resolver.lookup_ip(host).await {
                Ok(ips) => {
                    if let Some(ip) = ips.iter().next() {
                        out.insert(hp.clone(), SocketAddr::new(ip, port));
                    }
                }
                Err(e) => tracing::warn!("resolving peer {host} via {dns_server}: {e}"),
            }
        }
        Ok(out)
    })
}

fn resolver_for(dns_server: Option<&str>) -> Result<TokioAsyncResolver, String> {
    Ok(match dns_server {
        Some(s) => {
            let addr: SocketAddr = s
                .parse()
                .map_err(|e| format!("--discovery-dns-server {s}: {e}"))?;
            let mut cfg = ResolverConfig::new();
            cfg.add_name_server(NameServerConfig::new(addr, Protocol::Udp));
            TokioAsyncResolver::tokio(cfg, ResolverOpts::default())
        }
        None => TokioAsyncResolver::tokio_from_system_conf()
            .map_err(|e| format!("reading the system resolver configuration: {e}"))?,
    })
}

async fn lookup(
    domain: &str,
    name: &str,
    own_urls: &[String],
    dns_server: Option<&str>,
) -> Result<String, String> {
    let resolver = resolver_for(dns_server)?;
    let resolve = |hostport: String| {
        let resolver = &resolver;
        async move {
            let (host, port) = hostport
                .rsplit_once(':')
                .ok_or_else(|| format!("{hostport}: no port"))?;
            let port: u16 = port.parse().map_err(|e| format!("{hostport}: {e}"))?;
            if let Ok(ip) = host.parse::<std::net::IpAddr>() {
                return Ok::<_, String>(vec![SocketAddr::new(ip, port)]);
            }
            let ips = resolver
                .lookup_ip(host)
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?;
            Ok(ips.iter().map(|ip| SocketAddr::new(ip, port)).collect())
        }
    };
    let mut own = Vec::new();
    for u in own_urls {
        own.extend(resolve(crate::cluster::host_port(u)).await?);
    }
    let service = format!("_etcd-server._tcp.{domain}");
    let records = resolver
        .srv_lookup(service.as_str())
        .await
        .map_err(|e| format!("--discovery-srv: looking up {service}: {e}"))?;
    let mut parts = Vec::new();
    let mut found_self = false;
    let mut next_name = 0;
    for srv in records.iter().take(MAX_RECORDS) {
        let target = srv.target().to_utf8();
        let host = target.trim_end_matches('.');
        let hostport = format!("{host}:{}", srv.port());
        let addrs = resolve(hostport.clone()).await?;
        let n = if !found_self && addrs.iter().any(|a| own.contains(a)) {
            found_self = true;
            name.to_string()
        } else {
            next_name += 1;
            (next_name - 1).to_string()
        };
        parts.push(format!("{n}=http://{hostport}"));
    }
    if !found_self {
        return Err(format!(
            "--discovery-srv {domain}: no SRV record matches --initial-advertise-peer-urls {}",
            own_urls.join(",")
        ));
    }
    tracing::info!(cluster = %parts.join(","), "initial cluster from DNS SRV records");
    Ok(parts.join(","))
}
