"""A config-centre scenario with the Python `etcd3` client (python-etcd3 0.12) against
corekv's gRPC API: put/get, prefix listing, delete, compare-and-swap transactions,
and etcd's errors. Usage: python etcd3_scenario.py HOST:PORT [CA CERT KEY] (TLS with a
client certificate when the three files are given)"""
import sys

import etcd3

host, port = sys.argv[1].rsplit(":", 1)
tls = sys.argv[2:5]
if tls:
    ca, cert, key = tls
    client = etcd3.client(host=host, port=int(port), ca_cert=ca, cert_cert=cert, cert_key=key)
else:
    client = etcd3.client(host=host, port=int(port))

client.put("/config/app/db_url", "postgres://db:5432")
client.put("/config/app/pool", "10")
client.put("/config/other", "x")
value, meta = client.get("/config/app/pool")
assert value == b"10", value
assert meta.version == 1 and meta.mod_revision == meta.create_revision, meta

listed = {m.key.decode(): v.decode() for v, m in client.get_prefix("/config/app/")}
assert listed == {"/config/app/db_url": "postgres://db:5432", "/config/app/pool": "10"}, listed

# Compare-and-swap: only the winner of the version check updates.
ok, _ = client.transaction(
    compare=[client.transactions.version("/config/app/pool") == 1],
    success=[client.transactions.put("/config/app/pool", "20")],
    failure=[],
)
assert ok
ok, responses = client.transaction(
    compare=[client.transactions.version("/config/app/pool") == 1],
    success=[client.transactions.put("/config/app/pool", "30")],
    failure=[client.transactions.get("/config/app/pool")],
)
assert not ok
assert responses[0][0][0] == b"20", responses
assert client.get("/config/app/pool")[0] == b"20"

# Atomic create-if-absent (a lock-like idiom).
created, _ = client.transaction(
    compare=[client.transactions.create("/config/leader") == 0],
    success=[client.transactions.put("/config/leader", "node-a")],
    failure=[],
)
assert created
created, _ = client.transaction(
    compare=[client.transactions.create("/config/leader") == 0],
    success=[client.transactions.put("/config/leader", "node-b")],
    failure=[],
)
assert not created and client.get("/config/leader")[0] == b"node-a"

assert client.delete("/config/other")
assert client.get("/config/other") == (None, None)
deleted = client.delete_prefix("/config/app/")
assert deleted.deleted == 2, deleted

# Status + member list: the library resolves the leader through both RPCs.
status = client.status()
assert status.leader is not None and status.leader.name == "default", status.leader
assert status.raft_term >= 1 and status.db_size > 0

# etcd's errors surface through the library.
try:
    client.put("", "v")
    raise AssertionError("empty key accepted")
except Exception as e:  # grpc.RpcError with etcd's message
    assert "key is not provided" in str(e), e

print("etcd3 scenario: ok" + (" (TLS)" if tls else ""))
