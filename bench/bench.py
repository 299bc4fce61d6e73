"""Benchmarks ingestion against OpenSSH's sshd + internal-sftp in the same run.

Both servers are driven by the same OpenSSH `sftp` client with the same cipher and buffer settings,
and both write to a local folder. Each figure is the median of several runs with min and max; the
ratio is computed pair by pair (ours, then OpenSSH, then ours...), since absolute times on a shared
machine drift. Writes bench/results.md and bench/results.json.

Usage: python3 bench/bench.py --binary PATH [--smoke] [--runs N] [--out DIR] [--only TEXT]
"""

import argparse
import datetime
import itertools
import json
import math
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CIPHERS = ["aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
BENCH_USER = "ingestbench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port}")


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(os.urandom(min(left, 1 << 20)))
            left -= 1 << 20


def durable_write_mb_s(folder, size):
    """How fast this machine's disk takes `size` bytes written and fdatasync'd: the floor under any
    upload that, like ours, is on disk before its CLOSE is acknowledged."""
    target = folder / "disk-probe.bin"
    block = os.urandom(1 << 20)
    started = time.perf_counter()
    with open(target, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fdatasync(f.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return size / elapsed / 1e6


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def descendants(root):
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, queue = [], [root]
    while queue:
        pid = queue.pop()
        found.append(pid)
        queue.extend(children.get(pid, []))
    return found


class Ours:
    name = "ingestion"

    # No scanner answers: files stay in landing, so both servers do the same disk work.
    QUIET_PIPELINE = ('[scanner]\nengine = "clamd"\nclamd = "tcp://127.0.0.1:9"\n'
                      '[pipeline]\nretry_base = "1h"\nretry_cap = "1h"\n')

    def __init__(self, work, binary, key_pub, folder="ours", scanner=QUIET_PIPELINE):
        self.dir = work / folder
        (self.dir / "users").mkdir(parents=True)
        (self.dir / "egress").mkdir()
        self.port = free_port()
        (self.dir / "ingestion.toml").write_text(
            f'[admin]\nlisten = "off"\n[server]\nlisten = "127.0.0.1:{self.port}"\nmax_file_size = "20 GiB"\n'
            '[buckets]\nlanding = "buckets/landing"\nquarantine = "buckets/quarantine"\n[users]\ndir = "users"\n'
            + scanner +
            "[limits]\nmax_unauthenticated = 1000\nmax_unauthenticated_per_ip = 1000\nmax_sessions_per_user = 1000\n"
        )
        (self.dir / "users" / "bench.toml").write_text(
            f'username = "bench"\nname = "Bench"\nemail = "bench@example.org"\nssh_keys = ["{key_pub}"]\n'
            f'allowed_ips = ["127.0.0.1/32"]\ndestination = "buckets/delivered"\n'
            f'[egress]\nlocation = "{self.dir / "egress"}"\n'
        )
        self.process = subprocess.Popen(
            [binary, "serve", "--config", str(self.dir / "ingestion.toml")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "server.log", "w"),
        )
        wait_port(self.port)
        self.user = "bench"
        self.upload_dir = "/upload"
        self.download_dir = "/download"
        self.download_local = self.dir / "egress"
        self.landing = self.dir / "buckets" / "landing" / "bench"

    def clear_uploads(self):
        shutil.rmtree(self.landing, ignore_errors=True)

    def rss(self):
        return rss_kib([self.process.pid])

    def peak_rss_kib(self):
        """The process's high-water mark of resident memory (VmHWM)."""
        for line in pathlib.Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise SystemExit("no VmHWM in /proc status")

    def events(self, name):
        audit = self.dir / "state" / "audit.jsonl"
        lines = audit.read_text().splitlines() if audit.exists() else []
        return [event for event in map(json.loads, lines) if event.get("event") == name]

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


class OpenSsh:
    name = "OpenSSH"

    def __init__(self, work, key_pub):
        self.dir = work / "openssh"
        self.root = self.dir / "root"  # the chroot: owned by root, not writable by the user
        (self.root / "upload").mkdir(parents=True)
        (self.root / "download").mkdir()
        if subprocess.run(["id", BENCH_USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", BENCH_USER], check=True)
        # No password, but not locked: sshd without PAM refuses locked accounts ("!").
        subprocess.run(["usermod", "--password", "*", BENCH_USER], check=True)
        shutil.chown(self.root / "upload", BENCH_USER)
        for path in [self.dir, self.root]:
            os.chmod(path, 0o755)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.dir / "host_key")], check=True)
        (self.dir / "authorized_keys").write_text(key_pub + "\n")
        self.port = free_port()
        (self.dir / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.dir / 'host_key'}\n"
            f"PidFile {self.dir / 'sshd.pid'}\nAuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
            "MaxStartups 1000:30:1000\nMaxSessions 10\n"
            f"Subsystem sftp internal-sftp\nMatch User {BENCH_USER}\n  ChrootDirectory {self.root}\n"
            "  ForceCommand internal-sftp\n  AllowTcpForwarding no\n"
        )
        self.process = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "w"),
        )
        wait_port(self.port)
        self.user = BENCH_USER
        self.upload_dir = "/upload"
        self.download_dir = "/download"
        self.download_local = self.root / "download"
        self.landing = self.root / "upload"

    def clear_uploads(self):
        for entry in self.landing.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def rss(self):
        return rss_kib(descendants(self.process.pid))

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Clamd:
    """ClamAV's daemon on a free loopback port with a one-signature database (freshclam cannot
    download here), as the tests start it."""

    def __init__(self, work):
        self.dir = work / "clamd"
        (self.dir / "db").mkdir(parents=True)
        eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
        (self.dir / "db" / "custom.ndb").write_text(f"Custom.Test.EICAR-NDB:0:*:{eicar.hex()}\n")
        self.port = free_port()
        (self.dir / "clamd.conf").write_text(
            f"DatabaseDirectory {self.dir / 'db'}\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\nForeground yes\n"
            f"StreamMaxLength 100M\nMaxFileSize 100M\nMaxScanSize 400M\nLogFile {self.dir / 'clamd.log'}\n"
            f"TemporaryDirectory {self.dir}\n")
        binary = shutil.which("clamd") or "/usr/sbin/clamd"
        self.process = subprocess.Popen([binary, "--config-file", str(self.dir / "clamd.conf")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as connection:
                    connection.sendall(b"zPING\0")
                    if connection.recv(5) == b"PONG\0":
                        return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("clamd did not start")

    def address(self):
        return f"tcp://127.0.0.1:{self.port}"

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


class Client:
    def __init__(self, work, key):
        self.key = key
        self.known_hosts = work / "known_hosts"

    def command(self, server, cipher, batch="-"):
        return [
            "sftp", "-q", "-b", batch, "-B", "261120", "-R", "64", "-c", cipher,
            "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "LogLevel=ERROR", "-i", str(self.key), "-P", str(server.port), f"{server.user}@127.0.0.1",
        ]

    def run(self, server, cipher, script):
        # Each timed session starts with no dirty pages: OpenSSH answers before its bytes reach the
        # disk, and the kernel's writeback of them would otherwise slow whichever run comes next.
        os.sync()
        started = time.perf_counter()
        result = subprocess.run(self.command(server, cipher), input=script.encode(), capture_output=True)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"sftp against {server.name} failed: {result.stderr.decode()}")
        return elapsed


def put(server, durable=False):
    """The sftp upload command. Every upload here is on disk before its CLOSE is acknowledged;
    `durable` asks OpenSSH for the same (`put -f`: fsync@openssh.com before the close)."""
    return "put -f" if durable and isinstance(server, OpenSsh) else "put"


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


def alone(value, unit):
    """A figure measured on our side only (OpenSSH has no scanning or delivery to compare)."""
    return {"ingestion": {"median": value, "min": value, "max": value, "runs": [value]}, "unit": unit}


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def paired(servers, runs, measure, higher_is_better=True):
    """Runs `measure(server)` alternately on both servers; returns figures and pairwise ratios."""
    figures = {server.name: [] for server in servers}
    ratios = []
    for _ in range(runs):
        pair = [measure(server) for server in servers]
        for server, value in zip(servers, pair):
            figures[server.name].append(value)
        ours, theirs = pair
        ratios.append(ours / theirs if higher_is_better else theirs / ours)
    return {name: summary(values) for name, values in figures.items()} | {"ratio": summary(ratios)}


def audit_time(event):
    return datetime.datetime.fromisoformat(event["time"].replace("Z", "+00:00"))


def wait_for_events(server, name, count, seconds):
    deadline = time.monotonic() + seconds
    while True:
        events = server.events(name)
        if len(events) >= count:
            return events
        if time.monotonic() > deadline:
            raise SystemExit(f"{server.name}: {len(events)} of {count} `{name}` events after {seconds}s")
        time.sleep(0.5)


def delivery_latency(work, binary, key_pub, client, data, cipher, files):
    """Uploads `files` clean 1 MiB files in one session and measures, per file, the time from its
    CLOSE to its delivery (audit `close` → `delivered`), with clamd scanning."""
    clamd = Clamd(work)
    server = Ours(work, binary, key_pub, folder="delivering",
                  scanner=f'[scanner]\nengine = "clamd"\nclamd = "{clamd.address()}"\n')
    try:
        script = "".join(f"put {data / 'mib.bin'} {server.upload_dir}/l{index}.bin\n" for index in range(files))
        client.run(server, cipher, script)
        delivered = wait_for_events(server, "delivered", files, 600)
        closed = {event["job"]: audit_time(event) for event in server.events("close")}
        latencies = [(audit_time(event) - closed[event["job"]]).total_seconds() * 1000 for event in delivered]
    finally:
        server.stop()
        clamd.stop()
    name = f"close → delivered, {files} x 1 MiB, clamd"
    return [
        {"scenario": name, "cipher": cipher} | alone(percentile(latencies, 0.50), "ms p50 (target ≤ 100)"),
        {"scenario": name, "cipher": cipher} | alone(percentile(latencies, 0.99), "ms p99 (target ≤ 500)"),
    ]


def large_file_memory(work, binary, key_pub, client, cipher, size):
    """One upload of `size` bytes and its delivery (builtin scanner): the service's peak RSS."""
    server = Ours(work, binary, key_pub, folder=f"memory-{size >> 20}",
                  scanner='[scanner]\nengine = "builtin"\n')
    source = work / "huge.bin"
    try:
        write_random(source, size)
        client.run(server, cipher, f"put {source} {server.upload_dir}/huge.bin\n")
        source.unlink()
        wait_for_events(server, "delivered", 1, 3600)
        delivered = server.dir / "buckets" / "delivered" / "huge.bin"
        if delivered.stat().st_size != size:
            raise SystemExit(f"the {size >> 20} MiB file was not delivered whole")
        peak = server.peak_rss_kib() / 1024
    finally:
        server.stop()
        source.unlink(missing_ok=True)
        shutil.rmtree(server.dir, ignore_errors=True)
    return {"scenario": f"one {size >> 20} MiB upload + delivery: peak RSS", "cipher": cipher} \
        | alone(peak, "MiB (target ≤ 200, flat in size)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: checks the harness works")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
    parser.add_argument("--only", default="", help="run only the scenarios whose name contains this text")
    args = parser.parse_args()
    runs = 1 if args.smoke else max(args.runs, 5)
    big = (8 << 20) if args.smoke else (1 << 30)
    small_count = 20 if args.smoke else 1000
    sessions, per_session = (4, 2) if args.smoke else (200, 20)
    idle = 10 if args.smoke else 500

    # Under /var/lib: sshd wants every folder above a chroot owned by root and not world-writable.
    work = pathlib.Path(tempfile.mkdtemp(prefix="ingestion-bench-", dir="/var/lib"))
    pathlib.Path("/run/sshd").mkdir(exist_ok=True)
    os.chmod(work, 0o755)
    key = work / "client_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    key_pub = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    data = work / "data"
    data.mkdir()
    write_random(data / "big.bin", big)
    (data / "small").mkdir()
    for index in range(small_count):
        write_random(data / "small" / f"f{index:04}.bin", 64 << 10)
    write_random(data / "mib.bin", 1 << 20)
    run_numbers = itertools.count(1)
    disk = [durable_write_mb_s(work, big) for _ in range(1 if args.smoke else 3)]

    print(f"working in {work}", file=sys.stderr)
    servers = [Ours(work, args.binary, key_pub), OpenSsh(work, key_pub)]
    for server in servers:
        shutil.copy(data / "big.bin", server.download_local / "big.bin")
    client = Client(work, key)
    results = {"smoke": args.smoke, "disk_durable_write_mb_s": summary(disk), "scenarios": []}

    def wanted(scenario):
        return args.only in scenario

    def add(scenario, cipher, unit, measure, times=runs, higher_is_better=True):
        """Measures a scenario on both servers, pair by pair, unless --only leaves it out."""
        if wanted(scenario):
            results["scenarios"].append({"scenario": scenario, "cipher": cipher, "unit": unit}
                                        | paired(servers, times, measure, higher_is_better))

    try:
        for cipher in CIPHERS:
            def upload(server, durable=False):
                server.clear_uploads()
                elapsed = client.run(server, cipher,
                                     f"{put(server, durable)} {data / 'big.bin'} {server.upload_dir}/big.bin\n")
                return big / elapsed / 1e6

            add(f"one {big >> 20} MiB upload", cipher, "MB/s", upload)
            if cipher == CIPHERS[0]:
                add(f"one {big >> 20} MiB upload, OpenSSH with put -f", cipher, "MB/s",
                    lambda server: upload(server, True))

            def download(server):
                target = work / "downloaded.bin"
                elapsed = client.run(server, cipher, f"get {server.download_dir}/big.bin {target}\n")
                if target.stat().st_size != big:
                    raise SystemExit(f"{server.name}: short download")
                target.unlink()
                return big / elapsed / 1e6

            add(f"one {big >> 20} MiB download", cipher, "MB/s", download)

        cipher = CIPHERS[0]

        def many_small(server, durable=False):
            # New names in each run, as a supplier's files have: a name uploaded again before its
            # previous upload was scanned is a rarer case (here the quiet pipeline scans nothing).
            server.clear_uploads()
            folder = f"{server.upload_dir}/run{next(run_numbers)}"
            elapsed = client.run(server, cipher, f"mkdir {folder}\ncd {folder}\nlcd {data / 'small'}\n"
                                                 f"{put(server, durable)} *\n")
            return small_count / elapsed

        add(f"{small_count} files x 64 KiB, one session", cipher, "files/s", many_small)
        add(f"{small_count} files x 64 KiB, one session, OpenSSH with put -f", cipher, "files/s",
            lambda server: many_small(server, True))

        def concurrent(server):
            server.clear_uploads()
            run = next(run_numbers)
            script = "".join(f"put {data / 'mib.bin'} {server.upload_dir}/r{run}-s{{s}}-{i}.bin\n"
                             for i in range(per_session))
            started = time.perf_counter()
            processes = [subprocess.Popen(client.command(server, cipher), stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                         for _ in range(sessions)]
            for index, process in enumerate(processes):
                process.stdin.write(script.replace("{s}", str(index)).encode())
                process.stdin.close()
            failed = [p for p in processes if p.wait() != 0]
            elapsed = time.perf_counter() - started
            if failed:
                raise SystemExit(f"{server.name}: {len(failed)} sessions failed: {failed[0].stderr.read().decode()}")
            stored = sorted(server.landing.glob(f"r{run}-s*-*.bin"))
            if len(stored) != sessions * per_session or any(p.stat().st_size != 1 << 20 for p in stored):
                raise SystemExit(f"{server.name}: {len(stored)} of {sessions * per_session} files stored whole")
            return sessions * per_session * (1 << 20) / elapsed / 1e6

        add(f"{sessions} sessions x {per_session} x 1 MiB", cipher, "MB/s", concurrent)

        def idle_sessions(server):
            before = server.rss()
            processes = [subprocess.Popen(client.command(server, cipher), stdin=subprocess.PIPE,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for _ in range(idle)]
            # Each client logs in and waits on its open stdin; give them time, then read the peak.
            time.sleep(5 if args.smoke else 30)
            peak = server.rss()
            for process in processes:
                process.stdin.close()
            for process in processes:
                process.wait()
            return max(peak, before) / 1024

        add(f"{idle} idle sessions: server RSS", cipher, "MiB (lower is better; ratio = OpenSSH / ours)",
            idle_sessions, times=1 if args.smoke else 3, higher_is_better=False)
    finally:
        for server in servers:
            server.stop()
            # Several GiB of uploads and download sources: the 6 GiB scenario below needs the room.
            shutil.rmtree(server.dir, ignore_errors=True)

    # Our side only (OpenSSH neither scans nor delivers): CLOSE to delivery with a real clamd, and
    # the memory one very large upload and its delivery take.
    cipher = CIPHERS[0]
    if wanted("close → delivered"):
        results["scenarios"] += delivery_latency(work, args.binary, key_pub, client, data, cipher,
                                                 10 if args.smoke else 200)
    if wanted("upload + delivery: peak RSS"):
        for size in ([8 << 20, 32 << 20] if args.smoke else [1 << 30, 6 << 30]):
            results["scenarios"].append(large_file_memory(work, args.binary, key_pub, client, cipher, size))

    out = pathlib.Path(args.out)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Benchmark results" + (" (smoke run: sizes too small to mean anything)" if args.smoke else ""),
        "",
        "Median of the runs, [min–max]. Ratio: ours ÷ OpenSSH pair by pair (for RSS: OpenSSH ÷ ours), so above 1 is better.",
        "",
        "| scenario | cipher | unit | ingestion | OpenSSH | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        cell = lambda f: f"{f['median']:.1f} [{f['min']:.1f}–{f['max']:.1f}]" if f else "—"
        ratio = s.get("ratio")
        ratio = f"{ratio['median']:.2f} [{ratio['min']:.2f}–{ratio['max']:.2f}]" if ratio else "—"
        lines.append(f"| {s['scenario']} | {s['cipher']} | {s['unit']} | {cell(s['ingestion'])} | "
                     f"{cell(s.get('OpenSSH'))} | {ratio} |")
    lines += ["", f"Disk of this run, {big >> 20} MiB written and fdatasync'd: {statistics.median(disk):.0f} MB/s "
              f"(median of {len(disk)}; the floor under an upload that is on disk before its CLOSE is acknowledged)."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
