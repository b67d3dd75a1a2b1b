"""TCP transfers between ranks of a lab, to see what rate its links really give.

Each receiver listens in its rank's namespace; each sender, in its rank's namespace, connects, waits for a
common start time, writes 1 MiB chunks until ``start + seconds`` and closes. A receiver counts the bytes
that arrive inside a common wall-clock window ``[start + warmup, start + seconds]``, so concurrent
transfers are measured over the same interval, and neither process start-up, TCP slow start, the token
bucket's initial burst nor the socket buffers draining after the senders stop are counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from benchmarks.netlab.lab import Lab
from benchmarks.netlab.netns import NetlabError

_RECEIVER = r"""
import json, socket, sys, time
host, timeout = sys.argv[1], float(sys.argv[2])
srv = socket.socket()
srv.bind((host, 0))
srv.listen(1)
srv.settimeout(timeout)
print(srv.getsockname()[1], flush=True)
w0, w1 = (float(x) for x in sys.stdin.readline().split())
conn, _ = srv.accept()
conn.settimeout(timeout)
buf = bytearray(1 << 20)
counted = total = 0
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    total += n
    if w0 <= time.time() <= w1:
        counted += n
print(json.dumps({"bytes": counted, "seconds": w1 - w0, "total": total}), flush=True)
"""

_SENDER = r"""
import socket, sys, time
host, port, start, end, timeout = sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:6])
conn = socket.create_connection((host, port), timeout=timeout)
chunk = b"\0" * (1 << 20)
time.sleep(max(0.0, start - time.time()))
while time.time() < end:
    conn.sendall(chunk)
conn.shutdown(socket.SHUT_WR)
conn.recv(1)
conn.close()
"""


def measure_tcp(lab: Lab, src: int = 0, dst: int = 1, seconds: float = 1.0, timeout: float = 60.0) -> float:
    """Bits per second that one TCP connection from rank ``src`` to rank ``dst`` achieves."""
    return measure_concurrent(lab, [(src, dst)], seconds, timeout)[0]


def measure_concurrent(lab: Lab, pairs: list[tuple[int, int]], seconds: float = 1.0,
                       timeout: float = 60.0) -> list[float]:
    """One TCP connection per (src, dst) rank pair, all sending at the same time; bits/s of each over the
    same window (the last ``seconds - warmup`` seconds, warmup = min(0.25 s, seconds / 4))."""
    if seconds <= 0:
        raise ValueError(f"seconds={seconds!r}: must be positive")
    if not pairs:
        raise ValueError("pairs is empty: give at least one (src, dst) rank pair")
    for src, dst in pairs:
        if src == dst and lab.topology == "switch":
            raise ValueError(f"pair ({src}, {dst}): a transfer needs two different ranks")
    receivers: list[subprocess.Popen] = []
    senders: list[subprocess.Popen] = []
    try:
        ports = []
        for _, dst in pairs:
            rcv = lab.popen(dst, [sys.executable, "-c", _RECEIVER, lab.addresses[dst], str(timeout)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            receivers.append(rcv)
            assert rcv.stdout is not None
            port = rcv.stdout.readline().strip()
            if not port.isdigit():
                raise NetlabError(f"receiver in rank {dst} did not start: {rcv.communicate(timeout=5)[1]}")
            ports.append(port)
        start = time.time() + 0.3 + 0.1 * len(pairs)  # after every sender has started up
        end = start + seconds
        window = f"{start + min(0.25, seconds / 4)!r} {end!r}\n"
        for rcv in receivers:
            assert rcv.stdin is not None
            rcv.stdin.write(window)
            rcv.stdin.flush()  # communicate() closes it
        for (src, dst), port in zip(pairs, ports):
            argv = [sys.executable, "-c", _SENDER, lab.addresses[dst], port, repr(start), repr(end)]
            senders.append(lab.popen(src, [*argv, str(timeout)], stderr=subprocess.PIPE, text=True))
        send_errs = [snd.communicate(timeout=timeout)[1] for snd in senders]
        recv_outs = [rcv.communicate(timeout=timeout) for rcv in receivers]
    except subprocess.TimeoutExpired as exc:
        raise NetlabError(f"TCP transfers {pairs} did not finish within {timeout}s") from exc
    finally:
        for proc in receivers + senders:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rates = []
    for i, (src, dst) in enumerate(pairs):
        snd, rcv, send_err, (out, recv_err) = senders[i], receivers[i], send_errs[i], recv_outs[i]
        if snd.returncode != 0 or rcv.returncode != 0:
            raise NetlabError(f"TCP transfer rank {src} -> {dst} failed: sender {snd.returncode} "
                              f"{send_err.strip()!r}, receiver {rcv.returncode} {recv_err.strip()!r}")
        got = json.loads(out.strip().splitlines()[-1])
        if got["bytes"] <= 0:
            raise NetlabError(f"TCP transfer rank {src} -> {dst}: nothing arrived in the window ({got})")
        rates.append(got["bytes"] * 8 / got["seconds"])
    return rates
