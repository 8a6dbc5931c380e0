"""Where a proxy's added latency goes, from a loopback capture of one run.

    python3 legs.py PROXY_PORT ORIGIN_PORT TARGET-ROUND.pcap [...]

Each request carries a unique query (oha --rand-regex-url), so it is found on both
legs: client -> proxy, proxy -> origin, origin -> proxy, proxy -> client. A loopback
packet is stamped when its sender hands it to the device, so

    inbound  = proxy's request to the origin   - client's request to the proxy
    outbound = proxy's response to the client  - origin's response to the proxy

are the proxy's own share of a request's latency: waking on the readable socket,
reading, processing and writing, each way. Prints a table, a row per target: percentiles
of both legs and of their sum per request, in µs, medians over the target's rounds.
"""
import os
import statistics
import struct
import sys


def packets(path):
    """(seconds, source port, destination port, payload prefix) of every TCP packet."""
    with open(path, "rb") as f:
        data = f.read()
    magic = struct.unpack("<I", data[:4])[0]
    scale = {0xA1B2C3D4: 1e-6, 0xA1B23C4D: 1e-9}[magic]
    linktype = struct.unpack("<I", data[20:24])[0]
    link = {1: 14, 113: 16, 276: 20}[linktype]
    at = 24
    while at + 16 <= len(data):
        sec, frac, caplen, _ = struct.unpack("<IIII", data[at:at + 16])
        frame = data[at + 16:at + 16 + caplen]
        at += 16 + caplen
        ip = frame[link:]
        if len(ip) < 20 or ip[0] >> 4 != 4 or ip[9] != 6:
            continue
        tcp = ip[(ip[0] & 15) * 4:]
        sport, dport = struct.unpack(">HH", tcp[:4])
        yield sec + frac * scale, sport, dport, tcp[(tcp[12] >> 4) * 4:]


def request_id(payload):
    line = payload.split(b"\r\n", 1)[0]
    if not line.startswith(b"GET ") or b"?" not in line:
        return None
    return line.split(b" ")[1].split(b"?", 1)[1]


def legs(path, proxy_port, origin_port):
    """{request id: [client request, proxy request, origin response, proxy response]}."""
    seen = {}
    # Keep-alive without pipelining: a connection's response answers its oldest request.
    waiting = {}
    for t, sport, dport, payload in packets(path):
        if not payload:
            continue
        if dport in (proxy_port, origin_port):
            rid = request_id(payload)
            if rid is None:
                continue
            times = seen.setdefault(rid, [None] * 4)
            times[0 if dport == proxy_port else 1] = t
            waiting.setdefault((dport, sport), []).append(rid)
        elif sport in (proxy_port, origin_port) and payload.startswith(b"HTTP/"):
            queue = waiting.get((sport, dport))
            if queue:
                seen[queue.pop(0)][3 if sport == proxy_port else 2] = t
    return {rid: t for rid, t in seen.items() if None not in t}


def percentile(sorted_values, q):
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


QUANTILES = (0.5, 0.9, 0.99)


def summary(path, proxy_port, origin_port):
    found = legs(path, proxy_port, origin_port).values()
    series = {
        "inbound": [(t[1] - t[0]) * 1e6 for t in found],
        "outbound": [(t[3] - t[2]) * 1e6 for t in found],
        "both": [(t[1] - t[0] + t[3] - t[2]) * 1e6 for t in found],
    }
    row = {"requests": len(found)}
    for name, values in series.items():
        values.sort()
        for q in QUANTILES:
            row[(name, q)] = percentile(values, q) if values else None
    return row


def main():
    proxy_port, origin_port = int(sys.argv[1]), int(sys.argv[2])
    targets = {}
    for path in sys.argv[3:]:
        target = os.path.basename(path).rsplit("-", 1)[0]
        row = summary(path, proxy_port, origin_port)
        if row["requests"]:
            targets.setdefault(target, []).append(row)
    columns = [(name, q) for name in ("inbound", "outbound", "both") for q in QUANTILES]
    print("| target | requests matched (per round) | "
          + " | ".join(f"{name} p{int(q * 100)} µs" for name, q in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    for target, rows in targets.items():
        cells = [f"{statistics.median(r[c] for r in rows):.1f}" for c in columns]
        requests = statistics.median(r["requests"] for r in rows)
        print(f"| {target} | {requests:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
