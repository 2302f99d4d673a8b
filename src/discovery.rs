//! DNS SRV discovery (`--discovery-srv DOMAIN`): the initial cluster from the
//! `_etcd-server._tcp.DOMAIN` records, as etcd does.

/// Builds an `--initial-cluster` spec from SRV records.
pub fn initial_cluster_from_srv(
    domain: &str,
    _name: &str,
    _own_urls: &[String],
) -> Result<String, String> {
    Err(format!(
        "--discovery-srv {domain}: DNS SRV discovery is not implemented yet; use --initial-cluster"
    ))
}
