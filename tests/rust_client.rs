//! The Rust `etcd-client` crate (tonic, etcd's protos) runs a scenario against corekv
//! unchanged: KV, txn, maintenance status/alarms, cluster member list, and the
//! `Unimplemented` answer for features not built yet. Needs `protoc` to build, so it sits
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
        let mut c = Client::connect([ep], None).await.expect("connect");
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

        let err = c.lease_grant(10, None).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("corekv: lease is not implemented yet"),
            "{err}"
        );
    });
}
