# corekv native protocol: etcd's v3 KV API, shaped for Cap'n Proto RPC.
# Field meanings follow etcd's api/etcdserverpb/rpc.proto; errors travel as RPC
# exceptions whose text is etcd's error message (e.g. "etcdserver: key is not provided").
@0xd5b1a4c9e2f37a61;

struct ResponseHeader {
  clusterId @0 :UInt64;
  memberId @1 :UInt64;
  revision @2 :Int64;
  raftTerm @3 :UInt64;
}

struct KeyValue {
  key @0 :Data;
  createRevision @1 :Int64;
  modRevision @2 :Int64;
  version @3 :Int64;
  value @4 :Data;
  lease @5 :Int64;
}

enum SortOrder { none @0; ascend @1; descend @2; }
enum SortTarget { key @0; version @1; create @2; mod @3; value @4; }

struct RangeRequest {
  key @0 :Data;
  rangeEnd @1 :Data;
  limit @2 :Int64;
  revision @3 :Int64;
  sortOrder @4 :SortOrder;
  sortTarget @5 :SortTarget;
  serializable @6 :Bool;
  keysOnly @7 :Bool;
  countOnly @8 :Bool;
  minModRevision @9 :Int64;
  maxModRevision @10 :Int64;
  minCreateRevision @11 :Int64;
  maxCreateRevision @12 :Int64;
}

struct RangeResponse {
  header @0 :ResponseHeader;
  kvs @1 :List(KeyValue);
  more @2 :Bool;
  count @3 :Int64;
}

struct PutRequest {
  key @0 :Data;
  value @1 :Data;
  lease @2 :Int64;
  prevKv @3 :Bool;
  ignoreValue @4 :Bool;
  ignoreLease @5 :Bool;
}

struct PutResponse {
  header @0 :ResponseHeader;
  prevKv @1 :KeyValue;   # unset when there was no previous value or it was not asked for
}

struct DeleteRangeRequest {
  key @0 :Data;
  rangeEnd @1 :Data;
  prevKv @2 :Bool;
}

struct DeleteRangeResponse {
  header @0 :ResponseHeader;
  deleted @1 :Int64;
  prevKvs @2 :List(KeyValue);
}

enum CompareResult { equal @0; greater @1; less @2; notEqual @3; }

struct Compare {
  result @0 :CompareResult;
  key @1 :Data;
  rangeEnd @2 :Data;
  target :union {
    version @3 :Int64;
    createRevision @4 :Int64;
    modRevision @5 :Int64;
    value @6 :Data;
    lease @7 :Int64;
  }
}

struct RequestOp {
  union {
    range @0 :RangeRequest;
    put @1 :PutRequest;
    deleteRange @2 :DeleteRangeRequest;
    txn @3 :TxnRequest;
  }
}

struct ResponseOp {
  union {
    range @0 :RangeResponse;
    put @1 :PutResponse;
    deleteRange @2 :DeleteRangeResponse;
    txn @3 :TxnResponse;
  }
}

struct TxnRequest {
  compare @0 :List(Compare);
  success @1 :List(RequestOp);
  failure @2 :List(RequestOp);
}

struct TxnResponse {
  header @0 :ResponseHeader;
  succeeded @1 :Bool;
  responses @2 :List(ResponseOp);
}

struct CompactionRequest {
  revision @0 :Int64;
  physical @1 :Bool;
}

struct CompactionResponse {
  header @0 :ResponseHeader;
}

enum AlarmType { none @0; nospace @1; corrupt @2; }
enum AlarmAction { get @0; activate @1; deactivate @2; }

struct AlarmMember {
  memberId @0 :UInt64;
  alarm @1 :AlarmType;
}

struct AlarmRequest {
  action @0 :AlarmAction;
  memberId @1 :UInt64;
  alarm @2 :AlarmType;
}

struct AlarmResponse {
  header @0 :ResponseHeader;
  alarms @1 :List(AlarmMember);
}

struct StatusResponse {
  header @0 :ResponseHeader;
  version @1 :Text;
  dbSize @2 :Int64;
  dbSizeInUse @3 :Int64;
  leader @4 :UInt64;
  raftIndex @5 :UInt64;
  raftTerm @6 :UInt64;
  raftAppliedIndex @7 :UInt64;
  errors @8 :List(Text);
  isLearner @9 :Bool;
  # Group-commit evidence: WAL batches written, entries in them, and fdatasync latency.
  walBatches @10 :UInt64;
  walEntries @11 :UInt64;
  walFsyncP50Micros @12 :UInt64;
  walFsyncP99Micros @13 :UInt64;
  walMaxBatch @14 :UInt64;
}

struct LeaseGrantResponse {
  header @0 :ResponseHeader;
  id @1 :Int64;
  ttl @2 :Int64;
}

struct LeaseTimeToLiveResponse {
  header @0 :ResponseHeader;
  id @1 :Int64;
  ttl @2 :Int64;          # -1 when the lease does not exist
  grantedTtl @3 :Int64;
  keys @4 :List(Data);
}

enum EventType { put @0; delete @1; }

struct Event {
  type @0 :EventType;
  kv @1 :KeyValue;
  prevKv @2 :KeyValue;    # unset unless asked for and present
}

struct WatchRequest {
  key @0 :Data;
  rangeEnd @1 :Data;
  startRevision @2 :Int64;
  prevKv @3 :Bool;
  noPut @4 :Bool;
  noDelete @5 :Bool;
  progressNotify @6 :Bool;
}

# etcd's WatchResponse; one watch per `watch` call, so no watch id on the wire.
struct WatchResponse {
  header @0 :ResponseHeader;
  created @1 :Bool;
  canceled @2 :Bool;
  compactRevision @3 :Int64;
  cancelReason @4 :Text;
  events @5 :List(Event);
}

# Implemented by the client. The server sends one call at a time and waits for it to
# return (flow control): a watcher that falls behind catches up from the store.
interface WatchSink {
  send @0 (resp :WatchResponse) -> ();
}

struct LeaderKey {
  name @0 :Data;
  key @1 :Data;
  rev @2 :Int64;
  lease @3 :Int64;
}

struct Member {
  id @0 :UInt64;
  name @1 :Text;            # empty until the member has started and published itself
  peerUrls @2 :List(Text);
  clientUrls @3 :List(Text);
  isLearner @4 :Bool;
  nativeUrls @5 :List(Text);
}

interface Kv {
  range @0 (req :RangeRequest) -> (resp :RangeResponse);
  put @1 (req :PutRequest) -> (resp :PutResponse);
  deleteRange @2 (req :DeleteRangeRequest) -> (resp :DeleteRangeResponse);
  txn @3 (req :TxnRequest) -> (resp :TxnResponse);
  compact @4 (req :CompactionRequest) -> (resp :CompactionResponse);
  alarm @5 (req :AlarmRequest) -> (resp :AlarmResponse);
  status @6 () -> (resp :StatusResponse);

  leaseGrant @7 (id :Int64, ttl :Int64) -> (resp :LeaseGrantResponse);
  leaseRevoke @8 (id :Int64) -> (header :ResponseHeader);
  leaseKeepAlive @9 (id :Int64) -> (header :ResponseHeader, ttl :Int64);
  leaseTimeToLive @10 (id :Int64, keys :Bool) -> (resp :LeaseTimeToLiveResponse);
  leaseLeases @11 () -> (header :ResponseHeader, ids :List(Int64));

  # Returns when the watch ends (canceled by the server, or the sink fails); the client
  # cancels a watch by dropping this call.
  watch @12 (req :WatchRequest, sink :WatchSink) -> ();

  lock @13 (name :Data, lease :Int64) -> (header :ResponseHeader, key :Data);
  unlock @14 (key :Data) -> (header :ResponseHeader);
  campaign @15 (name :Data, lease :Int64, value :Data) -> (header :ResponseHeader, leader :LeaderKey);
  proclaim @16 (leader :LeaderKey, value :Data) -> (header :ResponseHeader);
  resign @17 (leader :LeaderKey) -> (header :ResponseHeader);
  leader @18 (name :Data) -> (header :ResponseHeader, kv :KeyValue);
  # Streams each new leader (and value change) to the sink as a one-event response.
  observe @19 (name :Data, sink :WatchSink) -> ();

  # Membership (etcd's Cluster service) and leader transfer.
  memberList @20 () -> (header :ResponseHeader, members :List(Member));
  memberAdd @21 (peerUrls :List(Text), isLearner :Bool) -> (header :ResponseHeader, member :Member, members :List(Member));
  memberRemove @22 (id :UInt64) -> (header :ResponseHeader, members :List(Member));
  memberUpdate @23 (id :UInt64, peerUrls :List(Text)) -> (header :ResponseHeader, members :List(Member));
  # `token`: set when a follower forwards a promotion to the leader (only the leader can
  # judge a learner's progress): the caller's auth token, so the leader judges the caller
  # rather than the forwarding connection. Empty: the connection's own identity.
  memberPromote @24 (id :UInt64, token :Text) -> (header :ResponseHeader, members :List(Member));
  moveLeader @25 (target :UInt64) -> (header :ResponseHeader);
  # etcd's HashKV at a revision (0 = current); compactRevision -1 = never compacted.
  hashKv @26 (revision :Int64) -> (header :ResponseHeader, hash :UInt32, compactRevision :Int64);
  # Online defragmentation of this member's store (etcd's Maintenance.Defragment).
  defragment @27 () -> (header :ResponseHeader);
  # Logs in (etcd's Authenticate): `kv` acts as the user for as long as `token` lives
  # (tokens are issued through raft, so the token is good on every member). The bootstrap
  # capability is a caller without a user.
  authenticate @28 (name :Text, password :Text) -> (kv :Kv, token :Text);
}
