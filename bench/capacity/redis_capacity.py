#!/usr/bin/env python3
"""Redis-side inputs of the capacity model (docs/capacity.md, issue 16 part 3).

Measures, against a real Redis on loopback, under a private key prefix that it
deletes afterwards:

  memory   bytes of Redis memory per agent: N agents written exactly as the
           projection writes them (agent key without expiry, certificate key
           with EXAT), `used_memory` before and after;
  mget     projection reads per second: the gateway's cache-miss lookup, one
           `MGET cert agent` per request, from C connections (no pipelining,
           and with 16 in flight per connection as the gateway's multiplexed
           connection does under a reconnect storm), for D seconds;
  fanout   one announcement to S subscribers: S real SUBSCRIBE connections,
           A announcements of the projection's size published one at a time;
           time from PUBLISH to the last subscriber's receipt (p50/p99/max)
           and Redis CPU per announcement.

Everything is bounded in count and time; only loopback addresses are allowed.

  python3 bench/capacity/redis_capacity.py [--redis 127.0.0.1:6379] [--agents 200000]
      [--subscribers 500] [--announcements 200] [--mget-seconds 5]

Standard library only (a minimal RESP client), so it runs on a fresh machine.
"""

import argparse
import ipaddress
import json
import os
import selectors
import socket
import statistics
import time
import uuid


class Resp:
    """A minimal blocking RESP2 client on one socket."""

    def __init__(self, host, port):
        self.s = socket.create_connection((host, port), timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    @staticmethod
    def encode(*args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if not isinstance(a, bytes):
                a = str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(a), a))
        return b"".join(out)

    def send(self, *args):
        self.s.sendall(self.encode(*args))

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n):
        while len(self.buf) < n + 2:
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def read(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self._exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"unexpected RESP type {t!r}")

    def call(self, *args):
        self.send(*args)
        return self.read()


def info(r, section):
    text = r.call("INFO", section).decode()
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v
    return out


def redis_cpu(r):
    i = info(r, "cpu")
    return float(i["used_cpu_sys"]) + float(i["used_cpu_user"])


def delete_prefix(r, prefix):
    cursor = b"0"
    deleted = 0
    for _ in range(100_000):
        cursor, keys = r.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
        if keys:
            deleted += r.call("UNLINK", *keys)
        if cursor == b"0":
            break
    return deleted


def measure_memory(r, prefix, agents):
    tenant = uuid.uuid4()
    before = int(info(r, "memory")["used_memory"])
    exat = int(time.time()) + 90 * 86400
    batch = []
    for _ in range(agents):
        agent = uuid.uuid4()
        serial = uuid.uuid4().hex
        batch.append(Resp.encode("SET", f"{prefix}agent:{tenant}:{agent}", "active"))
        batch.append(Resp.encode("SET", f"{prefix}cert:{serial}", "active", "EXAT", exat))
        if len(batch) >= 2000:
            r.s.sendall(b"".join(batch))
            for _ in batch:
                r.read()
            batch = []
    if batch:
        r.s.sendall(b"".join(batch))
        for _ in batch:
            r.read()
    after = int(info(r, "memory")["used_memory"])
    return (after - before) / agents, before, after


def measure_mget(host, port, prefix, conns, in_flight, seconds):
    """C connections, each keeping `in_flight` MGETs outstanding, for `seconds`."""
    keys = [(f"{prefix}cert:{uuid.uuid4().hex}", f"{prefix}agent:t:{uuid.uuid4()}") for _ in range(1000)]
    setup = Resp(host, port)
    for a, b in keys:
        setup.call("SET", a, "active")
        setup.call("SET", b, "active")
    # Every reply is the same 28 bytes: *2 $6 active $6 active.
    reply_len = len(b"*2\r\n$6\r\nactive\r\n$6\r\nactive\r\n")
    clients = [Resp(host, port) for _ in range(conns)]
    sel = selectors.DefaultSelector()
    done = 0
    for i, c in enumerate(clients):
        c.s.setblocking(False)
        c.pending = 0
        c.i = i
        sel.register(c.s, selectors.EVENT_READ, c)
    cmd = [Resp.encode("MGET", a, b) for a, b in keys]

    def fill(c):
        need = in_flight - c.pending
        if need > 0:
            data = b"".join(cmd[(c.i * 7 + c.pending + k) % len(cmd)] for k in range(need))
            c.s.setblocking(True)
            c.s.sendall(data)
            c.s.setblocking(False)
            c.pending += need

    for c in clients:
        fill(c)
    r0 = Resp(host, port)
    cpu0 = redis_cpu(r0)
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            try:
                chunk = c.s.recv(1 << 18)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError("redis closed a connection")
            c.carry = getattr(c, "carry", 0) + len(chunk)
            n, c.carry = divmod(c.carry, reply_len)
            if n:
                done += n
                c.pending -= n
                fill(c)
    elapsed = time.monotonic() - t0
    cpu = redis_cpu(r0) - cpu0
    for c in clients:
        c.s.close()
    return done / elapsed, done / max(cpu, 1e-9)


def measure_fanout(host, port, prefix, subscribers, announcements):
    channel = f"{prefix}revocation"
    subs = []
    for _ in range(subscribers):
        s = Resp(host, port)
        s.call("SUBSCRIBE", channel)
        s.s.setblocking(False)
        subs.append(s)
    pub = Resp(host, port)
    # Every subscriber is registered before the first publication.
    n = pub.call("PUBSUB", "NUMSUB", channel)[1]
    assert n == subscribers, f"{n} of {subscribers} subscribed"
    sel = selectors.DefaultSelector()
    for s in subs:
        sel.register(s.s, selectors.EVENT_READ, s)
    payload = json.dumps(
        {
            "seq": 0,
            "kind": "agent",
            "tenant_id": str(uuid.uuid4()),
            "agent_id": str(uuid.uuid4()),
            "status": "revoked",
        }
    ).encode()
    latencies = []
    cpu0 = redis_cpu(pub)
    for k in range(announcements):
        msg = payload.replace(b'"seq": 0', b'"seq": %d' % (k + 1))
        t0 = time.monotonic()
        receivers = pub.call("PUBLISH", channel, msg)
        got = 0
        deadline = t0 + 10
        while got < subscribers and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                s = key.data
                try:
                    chunk = s.s.recv(1 << 16)
                except BlockingIOError:
                    continue
                got += chunk.count(b"$7\r\nmessage\r\n")
        latencies.append((time.monotonic() - t0) * 1e3)
        assert receivers == subscribers and got >= subscribers, (receivers, got)
    cpu = redis_cpu(pub) - cpu0
    for s in subs:
        s.s.close()
    latencies.sort()
    pct = lambda p: latencies[round((len(latencies) - 1) * p)]
    return pct(0.5), pct(0.99), latencies[-1], cpu / announcements * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--redis", default="127.0.0.1:6379")
    ap.add_argument("--agents", type=int, default=200_000)
    ap.add_argument("--subscribers", type=int, default=500)
    ap.add_argument("--announcements", type=int, default=200)
    ap.add_argument("--mget-seconds", type=float, default=5.0)
    a = ap.parse_args()
    host, port = a.redis.rsplit(":", 1)
    if not ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
        raise SystemExit("loopback Redis only")
    a.agents = max(1, min(a.agents, 2_000_000))
    a.subscribers = max(1, min(a.subscribers, 5000))
    a.announcements = max(1, min(a.announcements, 10_000))
    a.mget_seconds = max(0.5, min(a.mget_seconds, 60))
    prefix = f"capacity:{uuid.uuid4().hex}:"
    r = Resp(host, int(port))
    version = info(r, "server")["redis_version"]
    print(f"Redis {version} at {a.redis}, prefix {prefix}")
    try:
        per_agent, before, after = measure_memory(r, prefix, a.agents)
        print(f"| Redis memory per agent (agent key + one certificate key) | {per_agent:.0f} bytes | {a.agents} agents, used_memory {before} → {after} |")
        for conns, in_flight in [(1, 1), (8, 1), (8, 16)]:
            rate, per_cpu = measure_mget(host, int(port), prefix, conns, in_flight, a.mget_seconds)
            print(f"| MGET (cert, agent) per second, {conns} connections × {in_flight} in flight | {rate:,.0f}/s | {per_cpu:,.0f} per Redis CPU-s |")
        p50, p99, mx, cpu_us = measure_fanout(host, int(port), prefix, a.subscribers, a.announcements)
        print(f"| one announcement to {a.subscribers} subscribers: PUBLISH → last receipt | p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {mx:.2f} ms | Redis {cpu_us:.0f} µs CPU per announcement ({a.announcements} announcements) |")
    finally:
        n = delete_prefix(r, prefix)
        print(f"deleted {n} keys under {prefix}")


if __name__ == "__main__":
    main()
