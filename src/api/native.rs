//! Conversions between the capnp wire types (schema/kv.capnp) and the internal model.
//! `read_*` decode (and never panic on hostile input), `write_*` encode.

use crate::kv_capnp as w;
use crate::model::*;
use capnp::Error;

type R<T> = Result<T, Error>;

pub fn write_header(mut b: w::response_header::Builder, h: &Header) {
    b.set_cluster_id(h.cluster_id);
    b.set_member_id(h.member_id);
    b.set_revision(h.revision);
    b.set_raft_term(h.raft_term);
}

pub fn read_header(r: w::response_header::Reader) -> Header {
    Header {
        cluster_id: r.get_cluster_id(),
        member_id: r.get_member_id(),
        revision: r.get_revision(),
        raft_term: r.get_raft_term(),
    }
}

pub fn write_kv(mut b: w::key_value::Builder, kv: &KeyValue) {
    b.set_key(&kv.key);
    b.set_create_revision(kv.create_revision);
    b.set_mod_revision(kv.mod_revision);
    b.set_version(kv.version);
    b.set_value(&kv.value);
    b.set_lease(kv.lease);
}

pub fn read_kv(r: w::key_value::Reader) -> R<KeyValue> {
    Ok(KeyValue {
        key: r.get_key()?.to_vec(),
        create_revision: r.get_create_revision(),
        mod_revision: r.get_mod_revision(),
        version: r.get_version(),
        value: r.get_value()?.to_vec(),
        lease: r.get_lease(),
    })
}

fn write_kvs(mut list: capnp::struct_list::Builder<w::key_value::Owned>, kvs: &[KeyValue]) {
    for (i, kv) in kvs.iter().enumerate() {
        write_kv(list.reborrow().get(i as u32), kv);
    }
}

fn read_kvs(list: capnp::struct_list::Reader<w::key_value::Owned>) -> R<Vec<KeyValue>> {
    list.iter().map(read_kv).collect()
}

pub fn write_range_req(mut b: w::range_request::Builder, r: &RangeRequest) {
    b.set_key(&r.key);
    b.set_range_end(&r.range_end);
    b.set_limit(r.limit);
    b.set_revision(r.revision);
    b.set_sort_order(match r.sort_order {
        SortOrder::None => w::SortOrder::None,
        SortOrder::Ascend => w::SortOrder::Ascend,
        SortOrder::Descend => w::SortOrder::Descend,
    });
    b.set_sort_target(match r.sort_target {
        SortTarget::Key => w::SortTarget::Key,
        SortTarget::Version => w::SortTarget::Version,
        SortTarget::Create => w::SortTarget::Create,
        SortTarget::Mod => w::SortTarget::Mod,
        SortTarget::Value => w::SortTarget::Value,
    });
    b.set_serializable(r.serializable);
    b.set_keys_only(r.keys_only);
    b.set_count_only(r.count_only);
    b.set_min_mod_revision(r.min_mod_revision);
    b.set_max_mod_revision(r.max_mod_revision);
    b.set_min_create_revision(r.min_create_revision);
    b.set_max_create_revision(r.max_create_revision);
}

pub fn read_range_req(r: w::range_request::Reader) -> R<RangeRequest> {
    Ok(RangeRequest {
        key: r.get_key()?.to_vec(),
        range_end: r.get_range_end()?.to_vec(),
        limit: r.get_limit(),
        revision: r.get_revision(),
        sort_order: match r.get_sort_order()? {
            w::SortOrder::None => SortOrder::None,
            w::SortOrder::Ascend => SortOrder::Ascend,
            w::SortOrder::Descend => SortOrder::Descend,
        },
        sort_target: match r.get_sort_target()? {
            w::SortTarget::Key => SortTarget::Key,
            w::SortTarget::Version => SortTarget::Version,
            w::SortTarget::Create => SortTarget::Create,
            w::SortTarget::Mod => SortTarget::Mod,
            w::SortTarget::Value => SortTarget::Value,
        },
        serializable: r.get_serializable(),
        keys_only: r.get_keys_only(),
        count_only: r.get_count_only(),
        min_mod_revision: r.get_min_mod_revision(),
        max_mod_revision: r.get_max_mod_revision(),
        min_create_revision: r.get_min_create_revision(),
        max_create_revision: r.get_max_create_revision(),
    })
}

pub fn write_range_resp(mut b: w::range_response::Builder, h: &Header, r: &RangeResponse) {
    write_header(b.reborrow().init_header(), h);
    write_kvs(b.reborrow().init_kvs(r.kvs.len() as u32), &r.kvs);
    b.set_more(r.more);
    b.set_count(r.count);
}

pub fn read_range_resp(r: w::range_response::Reader) -> R<(Header, RangeResponse)> {
    Ok((
        read_header(r.get_header()?),
        RangeResponse {
            kvs: read_kvs(r.get_kvs()?)?,
            more: r.get_more(),
            count: r.get_count(),
        },
    ))
}

pub fn write_put_req(mut b: w::put_request::Builder, p: &PutRequest) {
    b.set_key(&p.key);
    b.set_value(&p.value);
    b.set_lease(p.lease);
    b.set_prev_kv(p.prev_kv);
    b.set_ignore_value(p.ignore_value);
    b.set_ignore_lease(p.ignore_lease);
}

pub fn read_put_req(r: w::put_request::Reader) -> R<PutRequest> {
    Ok(PutRequest {
        key: r.get_key()?.to_vec(),
        value: r.get_value()?.to_vec(),
        lease: r.get_lease(),
        prev_kv: r.get_prev_kv(),
        ignore_value: r.get_ignore_value(),
        ignore_lease: r.get_ignore_lease(),
    })
}

pub fn write_put_resp(mut b: w::put_response::Builder, h: &Header, p: &PutResponse) {
    write_header(b.reborrow().init_header(), h);
    if let Some(kv) = &p.prev_kv {
        write_kv(b.init_prev_kv(), kv);
    }
}

pub fn read_put_resp(r: w::put_response::Reader) -> R<(Header, PutResponse)> {
    let prev_kv = if r.has_prev_kv() {
        Some(read_kv(r.get_prev_kv()?)?)
    } else {
        None
    };
    Ok((read_header(r.get_header()?), PutResponse { prev_kv }))
}

pub fn write_delete_req(mut b: w::delete_range_request::Builder, d: &DeleteRangeRequest) {
    b.set_key(&d.key);
    b.set_range_end(&d.range_end);
    b.set_prev_kv(d.prev_kv);
}

pub fn read_delete_req(r: w::delete_range_request::Reader) -> R<DeleteRangeRequest> {
    Ok(DeleteRangeRequest {
        key: r.get_key()?.to_vec(),
        range_end: r.get_range_end()?.to_vec(),
        prev_kv: r.get_prev_kv(),
    })
}

pub fn write_delete_resp(
    mut b: w::delete_range_response::Builder,
    h: &Header,
    d: &DeleteRangeResponse,
) {
    write_header(b.reborrow().init_header(), h);
    b.set_deleted(d.deleted);
    write_kvs(b.init_prev_kvs(d.prev_kvs.len() as u32), &d.prev_kvs);
}

pub fn read_delete_resp(r: w::delete_range_response::Reader) -> R<(Header, DeleteRangeResponse)> {
    Ok((
        read_header(r.get_header()?),
        DeleteRangeResponse {
            deleted: r.get_deleted(),
            prev_kvs: read_kvs(r.get_prev_kvs()?)?,
        },
    ))
}

fn write_compare(mut b: w::compare::Builder, c: &Compare) {
    b.set_key(&c.key);
    b.set_range_end(&c.range_end);
    b.set_result(match c.result {
        CompareResult::Equal => w::CompareResult::Equal,
        CompareResult::Greater => w::CompareResult::Greater,
        CompareResult::Less => w::CompareResult::Less,
        CompareResult::NotEqual => w::CompareResult::NotEqual,
    });
    let mut t = b.init_target();
    match &c.target {
        CompareTarget::Version(v) => t.set_version(*v),
        CompareTarget::Create(v) => t.set_create_revision(*v),
        CompareTarget::Mod(v) => t.set_mod_revision(*v),
        CompareTarget::Value(v) => t.set_value(v),
        CompareTarget::Lease(v) => t.set_lease(*v),
    }
}

fn read_compare(r: w::compare::Reader) -> R<Compare> {
    use w::compare::target::Which;
    Ok(Compare {
        key: r.get_key()?.to_vec(),
        range_end: r.get_range_end()?.to_vec(),
        result: match r.get_result()? {
            w::CompareResult::Equal => CompareResult::Equal,
            w::CompareResult::Greater => CompareResult::Greater,
            w::CompareResult::Less => CompareResult::Less,
            w::CompareResult::NotEqual => CompareResult::NotEqual,
        },
        target: match r.get_target().which()? {
            Which::Version(v) => CompareTarget::Version(v),
            Which::CreateRevision(v) => CompareTarget::Create(v),
            Which::ModRevision(v) => CompareTarget::Mod(v),
            Which::Value(v) => CompareTarget::Value(v?.to_vec()),
            Which::Lease(v) => CompareTarget::Lease(v),
        },
    })
}

fn write_op(b: w::request_op::Builder, op: &RequestOp) {
    match op {
        RequestOp::Range(r) => write_range_req(b.init_range(), r),
        RequestOp::Put(p) => write_put_req(b.init_put(), p),
        RequestOp::DeleteRange(d) => write_delete_req(b.init_delete_range(), d),
        RequestOp::Txn(t) => write_txn_req(b.init_txn(), t),
    }
}

/// Nesting depth bound for txns read off the wire (the traversal limit bounds size).
const MAX_TXN_DEPTH: u32 = 64;

fn read_op(r: w::request_op::Reader, depth: u32) -> R<RequestOp> {
    use w::request_op::Which;
    Ok(match r.which()? {
        Which::Range(x) => RequestOp::Range(read_range_req(x?)?),
        Which::Put(x) => RequestOp::Put(read_put_req(x?)?),
        Which::DeleteRange(x) => RequestOp::DeleteRange(read_delete_req(x?)?),
        Which::Txn(x) => RequestOp::Txn(read_txn_req_at(x?, depth + 1)?),
    })
}

pub fn write_txn_req(mut b: w::txn_request::Builder, t: &TxnRequest) {
    let mut cs = b.reborrow().init_compare(t.compare.len() as u32);
    for (i, c) in t.compare.iter().enumerate() {
        write_compare(cs.reborrow().get(i as u32), c);
    }
    let mut s = b.reborrow().init_success(t.success.len() as u32);
    for (i, op) in t.success.iter().enumerate() {
        write_op(s.reborrow().get(i as u32), op);
    }
    let mut f = b.init_failure(t.failure.len() as u32);
    for (i, op) in t.failure.iter().enumerate() {
        write_op(f.reborrow().get(i as u32), op);
    }
}

pub fn read_txn_req(r: w::txn_request::Reader) -> R<TxnRequest> {
    read_txn_req_at(r, 0)
}

fn read_txn_req_at(r: w::txn_request::Reader, depth: u32) -> R<TxnRequest> {
    if depth > MAX_TXN_DEPTH {
        return Err(Error::failed("etcdserver: txn nested too deeply".into()));
    }
    Ok(TxnRequest {
        compare: r
            .get_compare()?
            .iter()
            .map(read_compare)
            .collect::<R<_>>()?,
        success: r
            .get_success()?
            .iter()
            .map(|o| read_op(o, depth))
            .collect::<R<_>>()?,
        failure: r
            .get_failure()?
            .iter()
            .map(|o| read_op(o, depth))
            .collect::<R<_>>()?,
    })
}

pub fn write_txn_resp(mut b: w::txn_response::Builder, h: &Header, t: &TxnResponse) {
    write_header(b.reborrow().init_header(), h);
    b.set_succeeded(t.succeeded);
    let mut list = b.init_responses(t.responses.len() as u32);
    for (i, op) in t.responses.iter().enumerate() {
        let ob = list.reborrow().get(i as u32);
        // Nested headers carry only the revision as of that op, as etcd's do.
        let h = &Header {
            revision: t.op_revisions.get(i).copied().unwrap_or(h.revision),
            ..Default::default()
        };
        match op {
            ResponseOp::Range(r) => write_range_resp(ob.init_range(), h, r),
            ResponseOp::Put(p) => write_put_resp(ob.init_put(), h, p),
            ResponseOp::DeleteRange(d) => write_delete_resp(ob.init_delete_range(), h, d),
            ResponseOp::Txn(t) => write_txn_resp(ob.init_txn(), h, t),
        }
    }
}

pub fn read_txn_resp(r: w::txn_response::Reader) -> R<(Header, TxnResponse)> {
    use w::response_op::Which;
    let mut responses = Vec::new();
    let mut op_revisions = Vec::new();
    for op in r.get_responses()?.iter() {
        let (h, resp) = match op.which()? {
            Which::Range(x) => read_range_resp(x?).map(|(h, r)| (h, ResponseOp::Range(r)))?,
            Which::Put(x) => read_put_resp(x?).map(|(h, r)| (h, ResponseOp::Put(r)))?,
            Which::DeleteRange(x) => {
                read_delete_resp(x?).map(|(h, r)| (h, ResponseOp::DeleteRange(r)))?
            }
            Which::Txn(x) => read_txn_resp(x?).map(|(h, r)| (h, ResponseOp::Txn(r)))?,
        };
        op_revisions.push(h.revision);
        responses.push(resp);
    }
    Ok((
        read_header(r.get_header()?),
        TxnResponse {
            succeeded: r.get_succeeded(),
            responses,
            op_revisions,
        },
    ))
}

fn alarm_type_to_wire(a: AlarmType) -> w::AlarmType {
    match a {
        AlarmType::None => w::AlarmType::None,
        AlarmType::Nospace => w::AlarmType::Nospace,
        AlarmType::Corrupt => w::AlarmType::Corrupt,
    }
}

fn alarm_type_from_wire(a: w::AlarmType) -> AlarmType {
    match a {
        w::AlarmType::None => AlarmType::None,
        w::AlarmType::Nospace => AlarmType::Nospace,
        w::AlarmType::Corrupt => AlarmType::Corrupt,
    }
}

pub fn write_alarm_req(mut b: w::alarm_request::Builder, a: &AlarmRequest) {
    b.set_action(match a.action {
        AlarmAction::Get => w::AlarmAction::Get,
        AlarmAction::Activate => w::AlarmAction::Activate,
        AlarmAction::Deactivate => w::AlarmAction::Deactivate,
    });
    b.set_member_id(a.member_id);
    b.set_alarm(alarm_type_to_wire(a.alarm));
}

pub fn read_alarm_req(r: w::alarm_request::Reader) -> R<AlarmRequest> {
    Ok(AlarmRequest {
        action: match r.get_action()? {
            w::AlarmAction::Get => AlarmAction::Get,
            w::AlarmAction::Activate => AlarmAction::Activate,
            w::AlarmAction::Deactivate => AlarmAction::Deactivate,
        },
        member_id: r.get_member_id(),
        alarm: alarm_type_from_wire(r.get_alarm()?),
    })
}

pub fn write_alarm_resp(mut b: w::alarm_response::Builder, h: &Header, alarms: &[AlarmMember]) {
    write_header(b.reborrow().init_header(), h);
    let mut list = b.init_alarms(alarms.len() as u32);
    for (i, a) in alarms.iter().enumerate() {
        let mut m = list.reborrow().get(i as u32);
        m.set_member_id(a.member_id);
        m.set_alarm(alarm_type_to_wire(a.alarm));
    }
}

pub fn read_alarm_resp(r: w::alarm_response::Reader) -> R<(Header, Vec<AlarmMember>)> {
    let mut alarms = Vec::new();
    for m in r.get_alarms()?.iter() {
        alarms.push(AlarmMember {
            member_id: m.get_member_id(),
            alarm: alarm_type_from_wire(m.get_alarm()?),
        });
    }
    Ok((read_header(r.get_header()?), alarms))
}

pub fn write_status(mut b: w::status_response::Builder, h: &Header, s: &Status) {
    write_header(b.reborrow().init_header(), h);
    b.set_version(s.version.as_str());
    b.set_db_size(s.db_size);
    b.set_db_size_in_use(s.db_size_in_use);
    b.set_leader(s.leader);
    b.set_raft_index(s.raft_index);
    b.set_raft_term(s.raft_term);
    b.set_raft_applied_index(s.raft_applied_index);
    b.set_is_learner(s.is_learner);
    b.set_wal_batches(s.wal.batches);
    b.set_wal_entries(s.wal.entries);
    b.set_wal_max_batch(s.wal.max_batch);
    b.set_wal_fsync_p50_micros(s.wal.fsync_p50_us);
    b.set_wal_fsync_p99_micros(s.wal.fsync_p99_us);
    let mut errs = b.init_errors(s.errors.len() as u32);
    for (i, e) in s.errors.iter().enumerate() {
        errs.set(i as u32, e.as_str());
    }
}

pub fn read_status(r: w::status_response::Reader) -> R<(Header, Status)> {
    let mut errors = Vec::new();
    for e in r.get_errors()?.iter() {
        errors.push(e?.to_string()?);
    }
    Ok((
        read_header(r.get_header()?),
        Status {
            version: r.get_version()?.to_string()?,
            db_size: r.get_db_size(),
            db_size_in_use: r.get_db_size_in_use(),
            leader: r.get_leader(),
            raft_index: r.get_raft_index(),
            raft_term: r.get_raft_term(),
            raft_applied_index: r.get_raft_applied_index(),
            errors,
            is_learner: r.get_is_learner(),
            wal: WalStats {
                batches: r.get_wal_batches(),
                entries: r.get_wal_entries(),
                max_batch: r.get_wal_max_batch(),
                fsync_p50_us: r.get_wal_fsync_p50_micros(),
                fsync_p99_us: r.get_wal_fsync_p99_micros(),
            },
        },
    ))
}

pub fn write_event(mut b: w::event::Builder, e: &Event) {
    b.set_type(match e.kind {
        EventKind::Put => w::EventType::Put,
        EventKind::Delete => w::EventType::Delete,
    });
    write_kv(b.reborrow().init_kv(), &e.kv);
    if let Some(prev) = &e.prev_kv {
        write_kv(b.init_prev_kv(), prev);
    }
}

pub fn read_event(r: w::event::Reader) -> R<Event> {
    Ok(Event {
        kind: match r.get_type()? {
            w::EventType::Put => EventKind::Put,
            w::EventType::Delete => EventKind::Delete,
        },
        kv: read_kv(r.get_kv()?)?,
        prev_kv: if r.has_prev_kv() {
            Some(read_kv(r.get_prev_kv()?)?)
        } else {
            None
        },
    })
}

pub fn write_watch_req(mut b: w::watch_request::Builder, s: &crate::actors::watch::WatchSpec) {
    b.set_key(&s.key);
    b.set_range_end(&s.range_end);
    b.set_start_revision(s.start_rev);
    b.set_prev_kv(s.prev_kv);
    b.set_no_put(s.no_put);
    b.set_no_delete(s.no_delete);
    b.set_progress_notify(s.progress_notify);
}

pub fn read_watch_req(r: w::watch_request::Reader) -> R<crate::actors::watch::WatchSpec> {
    Ok(crate::actors::watch::WatchSpec {
        key: r.get_key()?.to_vec(),
        range_end: r.get_range_end()?.to_vec(),
        start_rev: r.get_start_revision(),
        prev_kv: r.get_prev_kv(),
        no_put: r.get_no_put(),
        no_delete: r.get_no_delete(),
        progress_notify: r.get_progress_notify(),
        ..Default::default()
    })
}

pub fn write_watch_resp(mut b: w::watch_response::Builder, resp: &WatchResponse) {
    write_header(b.reborrow().init_header(), &resp.header);
    b.set_created(resp.created);
    b.set_canceled(resp.canceled);
    b.set_compact_revision(resp.compact_revision);
    b.set_cancel_reason(resp.cancel_reason.as_str());
    let mut list = b.init_events(resp.events.len() as u32);
    for (i, e) in resp.events.iter().enumerate() {
        write_event(list.reborrow().get(i as u32), e);
    }
}

pub fn read_watch_resp(r: w::watch_response::Reader) -> R<WatchResponse> {
    Ok(WatchResponse {
        header: read_header(r.get_header()?),
        created: r.get_created(),
        canceled: r.get_canceled(),
        compact_revision: r.get_compact_revision(),
        cancel_reason: r
            .get_cancel_reason()?
            .to_string()
            .map_err(|e| Error::failed(format!("cancel reason: {e}")))?,
        events: r
            .get_events()?
            .iter()
            .map(read_event)
            .collect::<R<Vec<Event>>>()?,
    })
}

/// A hub message as the native wire's response (no watch ids: one watch per call).
pub fn watch_out_to_resp(out: crate::actors::watch::WatchOut) -> WatchResponse {
    use crate::actors::watch::WatchOut as O;
    match out {
        O::Created { header, error, .. } => WatchResponse {
            header,
            created: true,
            canceled: error.is_some(),
            cancel_reason: error.unwrap_or_default(),
            ..Default::default()
        },
        // One watch per native stream: one entry per message (several would be
        // one batch's events in order anyway).
        O::Events(list) => WatchResponse {
            header: list.first().map(|w| w.delivery.header).unwrap_or_default(),
            events: list
                .iter()
                .flat_map(|w| w.delivery.events.iter().cloned())
                .collect(),
            ..Default::default()
        },
        O::Canceled {
            header,
            compact_revision,
            reason,
            ..
        } => WatchResponse {
            header,
            canceled: true,
            compact_revision,
            cancel_reason: reason,
            ..Default::default()
        },
        O::Progress { header, .. } => WatchResponse {
            header,
            ..Default::default()
        },
    }
}

pub fn write_leader_key(mut b: w::leader_key::Builder, l: &LeaderKey) {
    b.set_name(&l.name);
    b.set_key(&l.key);
    b.set_rev(l.rev);
    b.set_lease(l.lease);
}

pub fn read_leader_key(r: w::leader_key::Reader) -> R<LeaderKey> {
    Ok(LeaderKey {
        name: r.get_name()?.to_vec(),
        key: r.get_key()?.to_vec(),
        rev: r.get_rev(),
        lease: r.get_lease(),
    })
}

fn write_texts(mut b: capnp::text_list::Builder, items: &[String]) {
    for (i, s) in items.iter().enumerate() {
        b.set(i as u32, s.as_str());
    }
}

fn read_texts(r: capnp::text_list::Reader) -> R<Vec<String>> {
    let mut out = Vec::with_capacity(r.len() as usize);
    for t in r.iter() {
        out.push(t?.to_string().map_err(|e| Error::failed(e.to_string()))?);
    }
    Ok(out)
}

pub fn write_member(mut b: w::member::Builder, m: &crate::cluster::Member) {
    b.set_id(m.id);
    b.set_name(m.name.as_str());
    b.set_is_learner(m.is_learner);
    write_texts(
        b.reborrow().init_peer_urls(m.peer_urls.len() as u32),
        &m.peer_urls,
    );
    write_texts(
        b.reborrow().init_client_urls(m.client_urls.len() as u32),
        &m.client_urls,
    );
    write_texts(
        b.init_native_urls(m.native_urls.len() as u32),
        &m.native_urls,
    );
}

pub fn write_members(
    mut b: capnp::struct_list::Builder<w::member::Owned>,
    ms: &[crate::cluster::Member],
) {
    for (i, m) in ms.iter().enumerate() {
        write_member(b.reborrow().get(i as u32), m);
    }
}

pub fn read_member(r: w::member::Reader) -> R<crate::cluster::Member> {
    Ok(crate::cluster::Member {
        id: r.get_id(),
        name: r
            .get_name()?
            .to_string()
            .map_err(|e| Error::failed(e.to_string()))?,
        peer_urls: read_texts(r.get_peer_urls()?)?,
        client_urls: read_texts(r.get_client_urls()?)?,
        is_learner: r.get_is_learner(),
        native_urls: read_texts(r.get_native_urls()?)?,
    })
}

pub fn read_members(
    r: capnp::struct_list::Reader<w::member::Owned>,
) -> R<Vec<crate::cluster::Member>> {
    r.iter().map(read_member).collect()
}

pub fn read_text_list(r: capnp::text_list::Reader) -> R<Vec<String>> {
    read_texts(r)
}
