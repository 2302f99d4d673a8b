//! The Rust `etcd-client` crate (tonic, etcd's protos) runs a scenario against corekv
//! unchanged: KV, txn, maintenance status/alarms, cluster member list, leases (grant,
//! keepalive stream, time-to-live with keys, revoke), watch, lock, election, and auth
//! (users, roles, enable, logged-in clients, refusals). Needs `protoc` to build, so it sits
//! behind the `etcd-client-test` feature; .ci/run runs it.
#![cfg(feature = "etcd-client-test")]

mod common;
use common::*;
use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

#[test]
fn etcd_client_crate_scenario() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&dir.path().join("d"), &SMALL_WAL);
    let ep = format!("http://{}", s.grpc_endpoint());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut c = Client::connect([ep.clone()], None).await.expect("connect");
        c.put("/svc/a", "10.0.0.1", None).await.unwrap();
        let prev = c
            .put(
                "/svc/a",
                "10.0.0.2",
                Some(PutOptions::new().with_prev_key()),
            )
            .await
            .unwrap();
        assert_eq!(prev.prev_key().unwrap().value(), b"10.0.0.1");
        c.put("/svc/b", "10.0.0.3", None).await.unwrap();

        let all = c
            .get("/svc/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(all.count(), 2);
        let rev = all.header().unwrap().revision();
        assert_eq!(all.kvs()[0].key(), b"/svc/a");
        assert_eq!(all.kvs()[0].version(), 2);

        // CAS on the mod revision, like a config update with optimistic locking.
        let a = &all.kvs()[0];
        let cas = Txn::new()
            .when([Compare::mod_revision(
                "/svc/a",
                CompareOp::Equal,
                a.mod_revision(),
            )])
            .and_then([TxnOp::put("/svc/a", "10.0.0.9", None)])
            .or_else([TxnOp::get("/svc/a", None)]);
        assert!(c.txn(cas.clone()).await.unwrap().succeeded());
        assert!(
            !c.txn(cas).await.unwrap().succeeded(),
            "stale CAS must fail"
        );

        let old = c
            .get("/svc/a", Some(GetOptions::new().with_revision(rev)))
            .await
            .unwrap();
        assert_eq!(old.kvs()[0].value(), b"10.0.0.2");
        let del = c
            .delete(
                "/svc/",
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(del.deleted(), 2);

        // etcd's errors as the crate's error type.
        let err = c
            .get("/x", Some(GetOptions::new().with_revision(1_000_000)))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("required revision is a future revision"),
            "{err}"
        );

        let status = c.status().await.unwrap();
        assert_eq!(status.leader(), status.header().unwrap().member_id());
        let members = c.member_list().await.unwrap();
        assert_eq!(members.members().len(), 1);
        assert_eq!(members.members()[0].name(), "default");
        assert!(c
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None
            )
            .await
            .unwrap()
            .alarms()
            .is_empty());

        // Leases: grant, attach, keepalive stream, time-to-live with keys.
        let lease = c.lease_grant(10, None).await.unwrap();
        assert_eq!(lease.ttl(), 10);
        let id = lease.id();
        c.put("lk", "v", Some(PutOptions::new().with_lease(id)))
            .await
            .unwrap();
        let (mut keeper, mut stream) = c.lease_keep_alive(id).await.unwrap();
        keeper.keep_alive().await.unwrap();
        assert_eq!(stream.message().await.unwrap().unwrap().ttl(), 10);
        let ttl = c
            .lease_time_to_live(
                id,
                Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
            )
            .await
            .unwrap();
        assert_eq!(ttl.keys(), &[b"lk".to_vec()]);

        // Watch: a prefix watch sees the put, with its value.
        let mut events = c
            .watch("wk", Some(etcd_client::WatchOptions::new().with_prefix()))
            .await
            .unwrap();
        c.put("wk1", "hello", None).await.unwrap();
        let seen = loop {
            let resp = events.message().await.unwrap().unwrap();
            if let Some(e) = resp.events().first() {
                break e.kv().unwrap().value().to_vec();
            }
        };
        assert_eq!(seen, b"hello");

        // Lock and election on the lease.
        let locked = c
            .lock(
                "lk-lock",
                Some(etcd_client::LockOptions::new().with_lease(id)),
            )
            .await
            .unwrap();
        assert!(locked.key().starts_with(b"lk-lock/"));
        c.unlock(locked.key()).await.unwrap();
        let campaign = c.campaign("el", "me", id).await.unwrap();
        let leader = c.leader("el").await.unwrap();
        assert_eq!(leader.kv().unwrap().value(), b"me");
        c.resign(Some(
            etcd_client::ResignOptions::new().with_leader(campaign.leader().unwrap().clone()),
        ))
        .await
        .unwrap();

        // Revoke deletes the attached key.
        c.lease_revoke(id).await.unwrap();
        assert!(c.get("lk", None).await.unwrap().kvs().is_empty());

        // Auth as the crate's users meet it: set up users and roles, enable, then
        // clients that log in (the crate authenticates and sends the token).
        c.user_add("root", "rootpw", None).await.unwrap();
        c.role_add("root").await.unwrap();
        c.user_grant_role("root", "root").await.unwrap();
        c.role_add("app").await.unwrap();
        let perm = etcd_client::Permission::read_write("/app/").with_prefix();
        c.role_grant_permission("app", perm).await.unwrap();
        c.user_add("alice", "apw", None).await.unwrap();
        c.user_grant_role("alice", "app").await.unwrap();
        c.auth_enable().await.unwrap();
        let err = c.put("x", "1", None).await.unwrap_err();
        assert!(
            err.to_string().contains("etcdserver: user name is empty"),
            "{err}"
        );
        let as_user = |name: &'static str, pw: &'static str| {
            let opts = etcd_client::ConnectOptions::new().with_user(name, pw);
            Client::connect([ep.clone()], Some(opts))
        };
        let mut alice = as_user("alice", "apw").await.unwrap();
        alice.put("/app/x", "1", None).await.unwrap();
        let got = alice.get("/app/x", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"1");
        let err = alice.put("/other", "1", None).await.unwrap_err();
        assert!(
            err.to_string().contains("etcdserver: permission denied"),
            "{err}"
        );
        assert!(
            as_user("alice", "wrong").await.is_err(),
            "a bad password is refused"
        );
        let mut root = as_user("root", "rootpw").await.unwrap();
        assert_eq!(root.user_list().await.unwrap().users(), ["alice", "root"]);
        let app = root.role_get("app").await.unwrap();
        assert_eq!(app.permissions().len(), 1);
        root.auth_disable().await.unwrap();
        c.put("x", "1", None).await.unwrap();
    });
}

/// The same crate over TLS with a client certificate (etcd-client's `tls` feature:
/// tonic's rustls): connect, put, get, txn, watch, lease against --client-cert-auth.
#[test]
fn etcd_client_crate_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = common::certs::ClientCertSetup::new(dir.path(), "rust");
    let (pki, client) = (&certs.pki, &certs.client);
    let ctl = certs.ctl_args();
    let ctl: Vec<&str> = ctl.iter().map(String::as_str).collect();
    let s = Server::start_tls(&dir.path().join("d"), &SMALL_WAL, &certs.serve_args(), &ctl);
    let ep = format!("https://{}", s.grpc_endpoint());
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca_file)))
        .identity(etcd_client::Identity::from_pem(
            read(&client.cert),
            read(&client.key),
        ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let opts = etcd_client::ConnectOptions::new().with_tls(tls);
        let mut c = Client::connect([ep.clone()], Some(opts))
            .await
            .expect("connect over TLS");
        c.put("/tls/a", "1", None).await.unwrap();
        let got = c.get("/tls/a", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"1");
        let cas = Txn::new()
            .when([Compare::version("/tls/a", CompareOp::Equal, 1)])
            .and_then([TxnOp::put("/tls/a", "2", None)]);
        assert!(c.txn(cas).await.unwrap().succeeded());
        let mut stream = c
            .watch(
                "/tls/",
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        c.put("/tls/b", "3", None).await.unwrap();
        let resp = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let r = stream.message().await.unwrap().unwrap();
                if !r.events().is_empty() {
                    return r;
                }
            }
        })
        .await
        .expect("watch event over TLS");
        assert_eq!(resp.events()[0].kv().unwrap().key(), b"/tls/b");
        let lease = c.lease_grant(30, None).await.unwrap();
        assert!(lease.ttl() > 0);
        // Without a client certificate the same server refuses the connection.
        let bare = etcd_client::ConnectOptions::new().with_tls(
            etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&pki.ca_file))),
        );
        let refused = async {
            let mut c = Client::connect([ep.clone()], Some(bare)).await?;
            c.get("/tls/a", None).await
        };
        assert!(
            refused.await.is_err(),
            "served without a client certificate"
        );
    });
}
