"""The controller's CPU per host for what a converged run does over SSH, without the testbed.

    python3 bench/connection_cpu.py [--hosts 50] [--sequential 20] [--rounds 5] [--profile]
        [--latency 0.1] [--parallel-latency 1.0] [--parallel-greeting 0.5]
        [--server-kex openssh-9.2|all] [--send-agent]

Per host, as the engine does on a converged server (provisioner/runner.py run_host): our
Connection opens (TCP, key exchange, the host key checked against known_hosts, publickey auth
with an ed25519 key file, as the testbed's), runs the agent twice through agent.call (lock, os
and every role's facts in one, as with the os facts kept from a run before (oscache); then
finish), each with a request on stdin and a JSON answer back of the sizes web1's roles have
(bench/simulated_fleet.py: 3.7/0.25 KB in, 29/0.1 KB out; --send-agent adds the agent's source
to every stdin, as on a cold agent cache), and closes.
The SSH server is tests/sshpeers.py's SshServer (paramiko) in a separate process, so that only
this process's CPU counts: time.process_time(), every thread of it (paramiko's transport
threads included). It presents ecdsa, ed25519 and rsa host keys, all in known_hosts (as the
testbed's servers), and by default offers the key exchanges of OpenSSH 9.2 (Debian 12, the
testbed's sshd), so the same algorithms are negotiated as there; they are printed.

Each round connects to --sequential servers one after the other, each exec taking --latency
seconds on the server (one testbed host: ~0.1 s), then to --hosts at once in a thread pool of
--forks (as the engine's), each exec taking --parallel-latency and the server's banner coming
--parallel-greeting late: on the testbed 50 servers share the controller's cores, so an exec
takes about a second and sshd is slow to answer, and how long a connection lives or waits
matters (paramiko's threads wake every 0.1 s while they wait). Set the latency to about a third
of the wall time bench/fleet_cpu.py prints for 50 hosts. The medians over --rounds of the CPU
per host are printed with the load average: CPU time, not wall time, yet a busy machine inflates
it (by half and more at a load of 5 on 2 cores), so compare two versions in runs taken in turn.
--profile then runs one more round of each under cProfile (one profile per thread, on the
thread's CPU time, merged) and prints where the CPU goes.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# (request bytes on stdin, answer bytes on stdout) of a converged run's two execs, web1's roles
# (the first is what were the os + lock exec and the roles' facts exec without the os cache)
EXECS = ((469 + 3233, 349 + 28818), (246, 69))
# what OpenSSH 9.2's sshd (Debian 12) offers and paramiko implements, in paramiko's order
OPENSSH_92_KEX = ("curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "ecdh-sha2-nistp384",
                  "ecdh-sha2-nistp521", "diffie-hellman-group16-sha512",
                  "diffie-hellman-group-exchange-sha256", "diffie-hellman-group14-sha256")


def serve(kex: str, greeting: float) -> None:
    """The server process: says its two ports and known_hosts lines on stdout, serves until
    stdin closes. Each exec answers, in the agent's format, after the time and with the size its
    request asks for. The second port's server sends its banner `greeting` seconds late."""
    import logging

    import paramiko
    from provisioner import agent
    from sshpeers import SshServer, ed25519_key, known_line
    logging.getLogger("paramiko").addHandler(logging.NullHandler())   # clients that hang up
    if kex == "openssh-9.2":
        paramiko.Transport._preferred_kex = tuple(
            k for k in OPENSSH_92_KEX if k in paramiko.Transport._preferred_kex)

    def execs(command: str, stdin: bytes) -> tuple[int, bytes]:
        request = json.loads(stdin)["request"]
        want = request["answer"]
        time.sleep(request["latency"])
        doc = {"agent": {"version": agent.PROTOCOL}, "cache": {"cached": True}, "facts": {}}
        doc["facts"]["pad"] = "y" * max(0, want - len(json.dumps(doc)) - len(agent.MARKER))
        return 0, agent.MARKER + json.dumps(doc).encode()

    keys = (paramiko.ECDSAKey.generate(), ed25519_key(), paramiko.RSAKey.generate(3072))
    with SshServer(*keys, execs=execs) as prompt, \
            SshServer(*keys, execs=execs, greeting=greeting) as busy:
        ports = [prompt.port, busy.port]
        print(json.dumps({"ports": ports, "known": "".join(
            known_line(f"[127.0.0.1]:{p}", k) for p in ports for k in keys)}), flush=True)
        sys.stdin.read()


def one_host(port: int, key: Path, known: Path, send_agent: bool, latency: float) -> dict:
    """What a converged run does on one host over SSH; the negotiated algorithms (but the key
    exchange's: see negotiated())."""
    from provisioner import agent
    from provisioner.connection import Connection
    host = SimpleNamespace(name="web1", address="127.0.0.1", port=port, user="root", key=key,
                           jump=None, connect_timeout=10, command_timeout=30)
    with Connection(host, known) as conn:
        if send_agent:
            conn.agent_cache = None
        for n_in, n_out in EXECS:
            request = {"answer": n_out, "latency": latency, "pad": ""}
            request["pad"] = "x" * max(0, n_in - len(agent.payload("facts", request, code=False)))
            agent.call(conn, "facts", request)
        t = conn._conn.transport
        aead = t.local_cipher.endswith("-gcm@openssh.com")      # paramiko names a MAC anyway
        return {"cipher": t.local_cipher, "mac": "(the cipher's)" if aead else t.local_mac,
                "host key": t.host_key_type}


def negotiated(*args) -> dict:
    """One host, its key exchange taken from paramiko's debug log (its engine object is gone
    once the exchange ends), and the rest from the transport."""
    import logging
    seen: list[str] = []

    class Kex(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Kex: "):
                seen.append(record.getMessage()[5:])
    log = logging.getLogger("paramiko.transport")
    handler, level = Kex(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        rest = one_host(*args)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return {"kex": seen[0] if seen else "?", **rest}


def sequential(n: int, latency: float, *args) -> list[float]:
    """CPU seconds of each host, one after the other."""
    out = []
    for _ in range(n):
        c0 = time.process_time()
        one_host(*args, latency)
        out.append(time.process_time() - c0)
    return out


def parallel(n: int, forks: int, latency: float, *args) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of n hosts at once."""
    c0, t0 = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(max_workers=forks) as pool:
        list(pool.map(lambda _: one_host(*args, latency), range(n)))
    return time.process_time() - c0, time.monotonic() - t0


class ThreadProfiles:
    """cProfile, on each thread's CPU time, in every thread started while active (paramiko's
    transport threads, the pool's workers) and in this one; stats() merges them once the
    threads have ended (a transport's thread outlives its close by up to 0.1 s)."""

    def __init__(self) -> None:
        self.done: list[cProfile.Profile] = []
        self.threads: list[threading.Thread] = []
        self._inner = threading.Thread._bootstrap_inner

    def __enter__(self):
        done, inner = self.done, self._inner

        def profiled(thread):
            p = cProfile.Profile(time.thread_time)
            p.enable()
            try:
                inner(thread)
            finally:
                p.disable()
                done.append(p)
        threading.Thread._bootstrap_inner = profiled
        self._start = threading.Thread.start
        started, start = self.threads, self._start

        def tracked(thread):
            started.append(thread)
            start(thread)
        threading.Thread.start = tracked
        self.main = cProfile.Profile(time.thread_time)
        self.main.enable()
        return self

    def __exit__(self, *exc) -> None:
        self.main.disable()
        threading.Thread._bootstrap_inner, threading.Thread.start = self._inner, self._start

    def stats(self) -> pstats.Stats:
        for t in self.threads:
            t.join(timeout=5)
        s = pstats.Stats(self.main, stream=io.StringIO())
        for p in self.done:
            s.add(p)
        return s


def top(stats: pstats.Stats, key: str, n: int) -> str:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats(key).print_stats(n)
    text = out.getvalue()
    return text[text.index("   ncalls"):].rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50, help="hosts at once, per round")
    ap.add_argument("--sequential", type=int, default=20, help="hosts one by one, per round")
    ap.add_argument("--forks", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--top", type=int, default=30, help="lines of each profile table")
    ap.add_argument("--server-kex", choices=("openssh-9.2", "all"), default="openssh-9.2",
                    help="all: every key exchange paramiko has (mlkem768x25519 first)")
    ap.add_argument("--send-agent", action="store_true",
                    help="the agent's source on every exec's stdin (a cold cache)")
    ap.add_argument("--latency", type=float, default=0.1,
                    help="seconds an exec takes on the server, one host at a time")
    ap.add_argument("--parallel-latency", type=float, default=1.0,
                    help="seconds an exec takes on the server, --hosts at once")
    ap.add_argument("--parallel-greeting", type=float, default=0.5,
                    help="seconds the server takes to send its banner, --hosts at once")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve(a.serve, a.parallel_greeting)
    server = subprocess.Popen([sys.executable, __file__, "--serve", a.server_kex,
                               "--parallel-greeting", str(a.parallel_greeting)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        peer = json.loads(server.stdout.readline())
        with tempfile.TemporaryDirectory() as tmp:
            from sshpeers import ed25519_key
            key, known = Path(tmp) / "id_ed25519", Path(tmp) / "known_hosts"
            ed25519_key(key)
            known.write_text(peer["known"])
            args = (peer["ports"][0], key, known, a.send_agent)
            busy = (peer["ports"][1], key, known, a.send_agent)
            algorithms = negotiated(*args, 0.0)              # warm-up: imports, first use
            sequential(3, 0.0, *args)
            parallel(min(a.forks, 5), a.forks, 0.0, *busy)
            seq, par, wall = [], [], []
            for _ in range(a.rounds):                        # interleaved: drift hits both
                seq.append(statistics.median(sequential(a.sequential, a.latency, *args)))
                cpu, seconds = parallel(a.hosts, a.forks, a.parallel_latency, *busy)
                par.append(cpu / a.hosts)
                wall.append(seconds)
            print(f"{a.sequential} hosts one by one and {a.hosts} at once (forks {a.forks}), "
                  f"{a.latency:g} s and {a.parallel_latency:g} s per exec (banner "
                  f"{a.parallel_greeting:g} s late at once), {a.rounds} rounds; negotiated: "
                  + ", ".join(f"{k} {v}" for k, v in algorithms.items())
                  + (", the agent's source on every exec" if a.send_agent else ""))
            for what, got in (("sequential:", seq), ("parallel:  ", par)):
                print(f"controller CPU per host, {what} median "
                      f"{statistics.median(got) * 1000:.2f} ms (rounds: "
                      f"{' '.join(f'{s * 1000:.2f}' for s in got)})")
            print(f"wall per round at once: {statistics.median(wall):.2f} s")
            print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on "
                  f"{os.cpu_count()} cores")
            if a.profile:
                with ThreadProfiles() as prof:
                    sequential(a.sequential, a.latency, *args)
                    parallel(a.hosts, a.forks, a.parallel_latency, *busy)
                stats = prof.stats()
                print(f"\nprofile of {a.sequential + a.hosts} hosts (cProfile slows Python code "
                      "more than C: shares, not times), by own time:")
                print(top(stats, "tottime", a.top))
                print("\nby cumulative time:")
                print(top(stats, "cumulative", a.top))
    finally:
        server.stdin.close()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
