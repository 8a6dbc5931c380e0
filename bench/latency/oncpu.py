"""What a proxy does on its CPUs at a fixed rate, from a scheduler and syscall trace.

    python3 oncpu.py TARGET-ROUND.trace [...]

Each TARGET-ROUND.trace is `perf script --ns -F comm,tid,cpu,time,event,trace` of
`perf record -e raw_syscalls:sys_enter,raw_syscalls:sys_exit,sched:sched_switch` on the
proxy's CPUs, beside TARGET-ROUND.tids (the proxy's thread ids) and
TARGET-ROUND.upstream (its file descriptors connected to the origin). Prints a table, a
row per target, medians over its rounds:

- inbound and outbound leg: user time from a read's return to the send that follows it
  on the same thread, when the read came from a client and the send goes to the origin
  (inbound), or the other way round (outbound). What the proxy computes for a request on
  its critical path, without the kernel's share and without waiting.
- user µs a request by what came before: every stretch of user time between two
  syscalls of a proxy thread, summed by the syscall it follows (a client's read, the
  origin's read, the send upstream, the send of the response, epoll_wait, anything
  else), divided by the responses sent. Work after the response has gone adds nothing
  to that request's latency, but the requests queued behind it on the thread wait for it.
- runs over 1 ms a second: how often a proxy thread stayed on the CPU for more than a
  millisecond, a backlog being served.
- other tasks: CPU time taken on the proxy's CPUs by tasks that are not the proxy (kernel
  threads, other processes), µs a second, and the longest single run of one of them:
  what a request waits behind that the proxy does not do.
"""
import os
import re
import statistics
import sys

LINE = re.compile(r"^\s*(.*?)\s+(\d+)\s+\[(\d+)\]\s+(\d+\.\d+):\s+(\S+):\s*(.*)$")
SWITCH = re.compile(r"prev_comm=(.*) prev_pid=(\d+) .*==> next_comm=(.*) next_pid=(\d+)")
READS = {0, 19, 45, 47}  # read, readv, recvfrom, recvmsg
SENDS = {1, 20, 44, 46}  # write, writev, sendto, sendmsg


PHASES = ("client read", "origin read", "send upstream", "send response", "epoll_wait", "other")


def phase(nr, fd, upstream):
    if nr in READS:
        return "origin read" if fd in upstream else "client read"
    if nr in SENDS:
        return "send upstream" if fd in upstream else "send response"
    if nr in (232, 281):
        return "epoll_wait"
    return "other"


def analyse(path):
    base = path[: -len(".trace")]
    tids = set(open(base + ".tids").read().split())
    upstream = set(open(base + ".upstream").read().split())
    entered = {}  # tid -> (syscall, fd) of the syscall it is in
    last_read = {}  # tid -> (time, fd) of its last read that returned data
    inbound, outbound = [], []
    exited = {}  # tid -> (time, phase) of its last return to user space
    user = dict.fromkeys(PHASES, 0.0)
    responses = 0
    running = {}  # cpu -> (tid, since)
    proxy_runs, other = [], {}
    first = last = None
    for line in open(path):
        m = LINE.match(line)
        if not m:
            continue
        comm, tid, cpu, t, event, rest = m.groups()
        t = float(t)
        first = t if first is None else first
        last = t
        if event == "sched:sched_switch":
            s = SWITCH.search(rest)
            if not s:
                continue
            prev_comm, prev_pid, _, next_pid = s.groups()
            was = running.get(cpu)
            if was and was[0] == prev_pid:
                took = (t - was[1]) * 1e6
                if prev_pid in tids:
                    proxy_runs.append(took)
                    # A stretch across a switch holds time off the CPU: not counted.
                    exited.pop(prev_pid, None)
                elif prev_pid != "0":
                    name = re.sub(r"\d+$", "", prev_comm)
                    total, longest = other.get(name, (0.0, 0.0))
                    other[name] = (total + took, max(longest, took))
            running[cpu] = (next_pid, t)
            continue
        if tid not in tids:
            continue
        fields = rest.split(None, 2)
        if event == "raw_syscalls:sys_enter":
            nr = int(fields[1])
            fd = str(int(fields[2].strip("(").split(",")[0], 16)) if len(fields) > 2 else ""
            entered[tid] = (nr, fd)
            if tid in exited:
                at, after = exited.pop(tid)
                user[after] += (t - at) * 1e6
            if nr in SENDS and fd not in upstream:
                responses += 1
            if nr in SENDS and tid in last_read:
                read_at, read_fd = last_read.pop(tid)
                if read_fd != fd:
                    took = (t - read_at) * 1e6
                    if fd in upstream and read_fd not in upstream:
                        inbound.append(took)
                    elif read_fd in upstream and fd not in upstream:
                        outbound.append(took)
        elif event == "raw_syscalls:sys_exit":
            nr, fd = entered.pop(tid, (None, None))
            if nr is not None:
                exited[tid] = (t, phase(nr, fd, upstream))
            if nr in READS and int(rest.rsplit("=", 1)[1]) > 0:
                last_read[tid] = (t, fd)
    seconds = max(last - first, 1e-9) if first is not None else 1e-9
    top = sorted(other.items(), key=lambda kv: -kv[1][0])[:3]
    return {
        "inbound p50": statistics.median(inbound) if inbound else float("nan"),
        "inbound mean": statistics.mean(inbound) if inbound else float("nan"),
        "outbound p50": statistics.median(outbound) if outbound else float("nan"),
        "outbound mean": statistics.mean(outbound) if outbound else float("nan"),
        "legs": len(inbound) + len(outbound),
        **{f"after {name}": total / max(responses, 1) for name, total in user.items()},
        "runs over 1 ms /s": sum(r > 1000 for r in proxy_runs) / seconds,
        "longest run µs": max(proxy_runs, default=0.0),
        "other tasks µs/s": sum(total for total, _ in other.values()) / seconds,
        "top": ", ".join(f"{name} {total / seconds:.0f} µs/s (longest {longest:.0f})"
                         for name, (total, longest) in top),
    }


def main():
    targets = {}
    for path in sys.argv[1:]:
        target = os.path.basename(path).rsplit("-", 1)[0]
        targets.setdefault(target, []).append(analyse(path))
    columns = ["inbound p50", "inbound mean", "outbound p50", "outbound mean",
               "runs over 1 ms /s", "longest run µs", "other tasks µs/s"]
    print("| target | legs matched (per round) | inbound µs p50 | inbound µs mean | "
          "outbound µs p50 | outbound µs mean | proxy runs over 1 ms a second | "
          "longest proxy run µs | other tasks on its CPUs µs a second |")
    print("|---|---:|" + "---:|" * len(columns))
    for target, rows in targets.items():
        cells = [f"{statistics.median(r[c] for r in rows):,.1f}" for c in columns]
        legs = statistics.median(r["legs"] for r in rows)
        print(f"| {target} | {legs:,.0f} | " + " | ".join(cells) + " |")
    print("\nUser µs a request, by the syscall the stretch follows (sum: the user CPU a "
          "request on the proxy threads):\n")
    after = [f"after {name}" for name in PHASES]
    print("| target | " + " | ".join(after) + " | sum |")
    print("|---|" + "---:|" * (len(after) + 1))
    for target, rows in targets.items():
        cells = [statistics.median(r[c] for r in rows) for c in after]
        print(f"| {target} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {sum(cells):.2f} |")
    print("\nBusiest other tasks on the proxy's CPUs, by round: " + "; ".join(
        f"{target} round {i}: {r['top'] or 'none'}"
        for target, rows in targets.items() for i, r in enumerate(rows, 1)) + ".")


if __name__ == "__main__":
    main()
