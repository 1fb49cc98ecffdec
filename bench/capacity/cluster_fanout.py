#!/usr/bin/env python3
"""Announcement fan-out on a real Redis Cluster: unsharded PUBLISH vs sharded SPUBLISH.

Issue 16 parts 2 and 3, ADR-0024. Starts its own cluster of M masters (redis-server on
free loopback ports in a temporary directory, `redis-cli --cluster create`, no replicas;
every server killed and the directory removed at exit), then G subscriber "gateways",
each subscribed as the gateway subscribes:

  unsharded  (shards = 1, prefix with a hash tag): each gateway SUBSCRIBEs to the one
             channel on one node (round robin over the nodes, as gateways spread over
             their seed lists); PUBLISH on the master of the prefix's slot, which the
             cluster bus forwards to every node.
  sharded    (shards = N): each gateway holds one connection per master and SSUBSCRIBEs
             there to the shard channels that master owns (as the redis crate's cluster
             connection does); announcement i is SPUBLISHed on shard i mod N's master.

For each mode: A announcements of the projection's size, one at a time; PUBLISH →
last gateway's receipt (p50/p99/max) and every node's Redis CPU (INFO cpu) per
announcement: the total, and the busiest node's share — the figure a node's core caps.

Then the gateways' cache-miss lookups (`MGET cert agent`) in both layouts: one agent in
each of T tenants, L lookups spread over them, each sent to the master owning the pair's
slot (32 in flight per master): lookups and Redis CPU per node.

  python3 bench/capacity/cluster_fanout.py [--masters 3] [--gateways 500]
      [--announcements 200] [--shards 12] [--tenants 2000] [--lookups 100000]

Bounded in count and time, loopback only; standard library only (redis-server and
redis-cli from the machine, as the tests use them).
"""

import argparse
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from redis_capacity import Resp, redis_cpu  # noqa: E402


def crc16(data):
    crc = 0
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def slot(key):
    k = key.encode()
    o = k.find(b"{")
    if o >= 0:
        c = k.find(b"}", o + 1)
        if c > o + 1:
            k = k[o + 1:c]
    return crc16(k) % 16384


def shard_tags(n):
    """The shard hash tags as identity::revocation::KeySchema::sharded builds them."""
    tags = []
    for k in range(n):
        lo, hi = k * 16384 // n, (k + 1) * 16384 // n
        i = 0
        while not lo <= crc16(f"s{k}-{i}".encode()) % 16384 < hi:
            i += 1
        tags.append(f"{{s{k}-{i}}}")
    return tags


def free_port():
    """A free loopback port whose cluster bus port (+10000) exists too."""
    for _ in range(1000):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port <= 55535:
            return port
    raise SystemExit("no free port below 55536")


def start_cluster(masters, tmp, procs):
    """Starts the masters (appending each process to `procs`, which the caller kills)."""
    ports = []
    for i in range(masters):
        port = free_port()
        log = open(os.path.join(tmp, f"redis-{port}.log"), "w")
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--cluster-enabled", "yes", "--cluster-config-file",
             f"nodes-{i}.conf", "--dir", tmp, "--protected-mode", "no"],
            stdout=log, stderr=subprocess.STDOUT))
        ports.append(port)
    for port in ports:
        for _ in range(400):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.025)
        else:
            with open(os.path.join(tmp, f"redis-{port}.log")) as f:
                raise SystemExit(f"redis-server on {port} did not start:\n{f.read()}")
    out = subprocess.run(["redis-cli", "--cluster", "create",
                          *[f"127.0.0.1:{p}" for p in ports],
                          "--cluster-replicas", "0", "--cluster-yes"],
                         capture_output=True, timeout=60, text=True)
    if out.returncode != 0:
        raise SystemExit(f"redis-cli --cluster create failed:\n{out.stdout}{out.stderr}")
    for port in ports:
        r = Resp("127.0.0.1", port)
        for _ in range(400):
            if b"cluster_state:ok" in r.call("CLUSTER", "INFO"):
                break
            time.sleep(0.025)
        r.s.close()
    return ports


def owners(port):
    """slot -> port of the master serving it."""
    r = Resp("127.0.0.1", port)
    out = {}
    for lo, hi, master, *_ in r.call("CLUSTER", "SLOTS"):
        for s in range(lo, hi + 1):
            out[s] = master[1]
    r.s.close()
    return out


def run(mode, ports, owner, gateways, announcements, shards):
    prefix = f"fanout:{uuid.uuid4().hex[:8]}:"
    conns, sel = [], selectors.DefaultSelector()
    if mode == "unsharded":
        channel = "{%s}revocation" % prefix.rstrip(":")
        targets = [(owner[slot(channel)], channel)] * announcements
        for g in range(gateways):
            c = Resp("127.0.0.1", ports[g % len(ports)])
            c.call("SUBSCRIBE", channel)
            conns.append(c)
        cmd, marker = "PUBLISH", b"$7\r\nmessage\r\n"
    else:
        channels = [f"{prefix}{t}revocation" for t in shard_tags(shards)]
        by_node = {}
        for ch in channels:
            by_node.setdefault(owner[slot(ch)], []).append(ch)
        targets = [(owner[slot(channels[i % shards])], channels[i % shards])
                   for i in range(announcements)]
        for _ in range(gateways):
            for port, chs in by_node.items():
                c = Resp("127.0.0.1", port)
                # One channel per SSUBSCRIBE: several must share a slot.
                for ch in chs:
                    c.call("SSUBSCRIBE", ch)
                conns.append(c)
        cmd, marker = "SPUBLISH", b"$8\r\nsmessage\r\n"
    for c in conns:
        c.s.setblocking(False)
        sel.register(c.s, selectors.EVENT_READ, c)
    pubs = {p: Resp("127.0.0.1", p) for p in ports}
    payload = json.dumps({"seq": 0, "kind": "agent", "tenant_id": str(uuid.uuid4()),
                          "agent_id": str(uuid.uuid4()), "status": "revoked"})
    cpu0 = {p: redis_cpu(r) for p, r in pubs.items()}
    lat = []
    t_all = time.monotonic()
    for k, (port, ch) in enumerate(targets):
        msg = payload.replace('"seq": 0', f'"seq": {k + 1}')
        t0 = time.monotonic()
        pubs[port].call(cmd, ch, msg)
        got, deadline = 0, t0 + 10
        while got < gateways and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                try:
                    chunk = key.data.s.recv(1 << 16)
                except BlockingIOError:
                    continue
                got += chunk.count(marker)
        assert got >= gateways, f"{mode}: {got} of {gateways} received announcement {k}"
        lat.append((time.monotonic() - t0) * 1e3)
    elapsed = time.monotonic() - t_all
    cpu = {p: (redis_cpu(r) - cpu0[p]) / announcements * 1e6 for p, r in pubs.items()}
    for c in conns:
        c.s.close()
    for r in pubs.values():
        r.s.close()
    lat.sort()
    pct = lambda q: lat[round((len(lat) - 1) * q)]
    total = sum(cpu.values())
    busiest = max(cpu.values())
    print(f"| {mode} | {len(conns)} | {pct(0.5):.2f} / {pct(0.99):.2f} / {lat[-1]:.2f} ms | "
          f"{total:.0f} µs | {busiest:.0f} µs ({' / '.join(f'{cpu[p]:.0f}' for p in ports)}) | "
          f"{1e6 / busiest:,.0f}/s | {elapsed:.1f} s |")


def reads(mode, ports, owner, tenants, lookups, shards):
    """`lookups` cache-miss lookups (`MGET cert agent` of a random agent of one of
    `tenants` tenants) sent to the master owning the pair's slot, 32 in flight per
    master; every node's Redis CPU per lookup. Unsharded, every pair is in the
    prefix's slot; sharded, in its tenant's shard."""
    prefix = f"reads:{uuid.uuid4().hex[:8]}:"
    tags = shard_tags(shards)
    pairs = []
    for _ in range(tenants):
        t = str(uuid.uuid4())
        tag = "{%s}" % prefix.rstrip(":") if mode == "unsharded" else tags[crc16(t.encode()) % shards]
        base = prefix if mode == "sharded" else ""
        a, serial = str(uuid.uuid4()), uuid.uuid4().hex
        pairs.append((f"{base}{tag}cert:{serial}", f"{base}{tag}agent:{t}:{a}"))
    conns = {p: Resp("127.0.0.1", p) for p in ports}
    for ck, ak in pairs:
        c = conns[owner[slot(ck)]]
        c.send("SET", ck, "active")
        c.send("SET", ak, "active")
    for ck, ak in pairs:
        c = conns[owner[slot(ck)]]
        c.read()
        c.read()
    cpu0 = {p: redis_cpu(r) for p, r in conns.items()}
    per_node = {p: 0 for p in ports}
    t0 = time.monotonic()
    batch = 32
    for i in range(0, lookups, batch):
        sent = {p: 0 for p in ports}
        for j in range(i, min(i + batch, lookups)):
            ck, ak = pairs[(j * 7919) % len(pairs)]
            p = owner[slot(ck)]
            conns[p].send("MGET", ck, ak)
            sent[p] += 1
        for p, n in sent.items():
            for _ in range(n):
                assert conns[p].read() == [b"active", b"active"]
            per_node[p] += n
    elapsed = time.monotonic() - t0
    cpu = {p: (redis_cpu(r) - cpu0[p]) for p, r in conns.items()}
    for ck, ak in pairs:
        conns[owner[slot(ck)]].send("UNLINK", ck, ak)
    for ck, ak in pairs:
        conns[owner[slot(ck)]].read()
    for r in conns.values():
        r.s.close()
    busiest = max(cpu.values()) / lookups * 1e6
    print(f"| {mode} | {lookups:,} over {tenants:,} tenants | "
          f"{' / '.join(f'{per_node[p]:,}' for p in ports)} | "
          f"{' / '.join(f'{cpu[p] / lookups * 1e6:.2f}' for p in ports)} µs | "
          f"{1e6 / busiest:,.0f}/s | {lookups / elapsed:,.0f}/s |")


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--gateways", type=int, default=500)
    ap.add_argument("--announcements", type=int, default=200)
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--tenants", type=int, default=2000)
    ap.add_argument("--lookups", type=int, default=100_000)
    a = ap.parse_args()
    a.tenants = max(12, min(a.tenants, 100_000))
    a.lookups = max(1000, min(a.lookups, 2_000_000))
    a.masters = max(3, min(a.masters, 8))
    a.gateways = max(1, min(a.gateways, 2000))
    a.announcements = max(1, min(a.announcements, 5000))
    a.shards = max(2, min(a.shards, 1024))
    for tool in ("redis-server", "redis-cli"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not on PATH (apt-get install redis-server)")
    tmp = tempfile.mkdtemp(prefix="cluster-fanout.")
    procs = []
    try:
        ports = start_cluster(a.masters, tmp, procs)
        owner = owners(ports[0])
        version = Resp("127.0.0.1", ports[0]).call("INFO", "server").decode()
        version = next(l.split(":", 1)[1] for l in version.splitlines()
                       if l.startswith("redis_version:"))
        print(f"Redis {version.strip()} cluster of {a.masters} masters on {ports}; "
              f"{a.gateways} gateways, {a.announcements} announcements, {a.shards} shards")
        print("| mode | subscriber connections | publish → last receipt p50 / p99 / max | "
              "Redis CPU per announcement, all nodes | busiest node (per node) | "
              "announcements/s one core of the busiest node allows | run |")
        print("|---|---:|---|---:|---|---:|---:|")
        for mode in ("unsharded", "sharded"):
            run(mode, ports, owner, a.gateways, a.announcements, a.shards)
        print()
        print("| mode | lookups | lookups per node | Redis CPU per fleet lookup, per node | "
              "lookups/s one core of the busiest node allows | this client's rate |")
        print("|---|---|---|---|---:|---:|")
        for mode in ("unsharded", "sharded"):
            reads(mode, ports, owner, a.tenants, a.lookups, a.shards)
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
