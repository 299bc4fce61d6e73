"""Benchmarks ingestion against OpenSSH's sshd + internal-sftp in the same run.

Both servers are driven by the same OpenSSH `sftp` client with the same cipher and buffer settings,
and both write to a local folder. Each figure is the median of several runs with min and max; the
ratio is computed pair by pair (ours, then OpenSSH, then ours...), since absolute times on a shared
machine drift. Writes bench/results.md and bench/results.json.

Usage: python3 bench/bench.py --binary PATH [--smoke] [--runs N] [--out DIR]
"""

import argparse
import json
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

    def __init__(self, work, binary, key_pub):
        self.dir = work / "ours"
        (self.dir / "users").mkdir(parents=True)
        (self.dir / "egress").mkdir()
        self.port = free_port()
        (self.dir / "ingestion.toml").write_text(
            f'[admin]\nlisten = "off"\n[server]\nlisten = "127.0.0.1:{self.port}"\nmax_file_size = "20 GiB"\n'
            '[buckets]\nlanding = "buckets/landing"\nquarantine = "buckets/quarantine"\n[users]\ndir = "users"\n'
            # No scanner answers: files stay in landing, so both servers do the same disk work.
            '[scanner]\nengine = "clamd"\nclamd = "tcp://127.0.0.1:9"\n[pipeline]\nretry_base = "1h"\nretry_cap = "1h"\n'
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
        started = time.perf_counter()
        result = subprocess.run(self.command(server, cipher), input=script.encode(), capture_output=True)
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"sftp against {server.name} failed: {result.stderr.decode()}")
        return elapsed


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run: checks the harness works")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent))
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

    print(f"working in {work}", file=sys.stderr)
    servers = [Ours(work, args.binary, key_pub), OpenSsh(work, key_pub)]
    for server in servers:
        shutil.copy(data / "big.bin", server.download_local / "big.bin")
    client = Client(work, key)
    results = {"smoke": args.smoke, "scenarios": []}
    try:
        for cipher in CIPHERS:
            def upload(server):
                server.clear_uploads()
                elapsed = client.run(server, cipher, f"put {data / 'big.bin'} {server.upload_dir}/big.bin\n")
                return big / elapsed / 1e6

            results["scenarios"].append({"scenario": f"one {big >> 20} MiB upload", "cipher": cipher,
                                         "unit": "MB/s"} | paired(servers, runs, upload))

            def download(server):
                target = work / "downloaded.bin"
                elapsed = client.run(server, cipher, f"get {server.download_dir}/big.bin {target}\n")
                if target.stat().st_size != big:
                    raise SystemExit(f"{server.name}: short download")
                target.unlink()
                return big / elapsed / 1e6

            results["scenarios"].append({"scenario": f"one {big >> 20} MiB download", "cipher": cipher,
                                         "unit": "MB/s"} | paired(servers, runs, download))

        cipher = CIPHERS[0]

        def many_small(server):
            server.clear_uploads()
            elapsed = client.run(server, cipher, f"cd {server.upload_dir}\nlcd {data / 'small'}\nput *\n")
            return small_count / elapsed

        results["scenarios"].append({"scenario": f"{small_count} files x 64 KiB, one session", "cipher": cipher,
                                     "unit": "files/s"} | paired(servers, runs, many_small))

        def concurrent(server):
            server.clear_uploads()
            script = "".join(f"put {data / 'mib.bin'} {server.upload_dir}/s{{s}}-{i}.bin\n" for i in range(per_session))
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
            stored = sorted(server.landing.glob("s*-*.bin"))
            if len(stored) != sessions * per_session or any(p.stat().st_size != 1 << 20 for p in stored):
                raise SystemExit(f"{server.name}: {len(stored)} of {sessions * per_session} files stored whole")
            return sessions * per_session * (1 << 20) / elapsed / 1e6

        results["scenarios"].append({"scenario": f"{sessions} sessions x {per_session} x 1 MiB", "cipher": cipher,
                                     "unit": "MB/s"} | paired(servers, runs, concurrent))

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

        results["scenarios"].append({"scenario": f"{idle} idle sessions: server RSS", "cipher": cipher,
                                     "unit": "MiB (lower is better; ratio = OpenSSH / ours)"}
                                    | paired(servers, 1 if args.smoke else 3, idle_sessions, higher_is_better=False))
    finally:
        for server in servers:
            server.stop()

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
        cell = lambda f: f"{f['median']:.1f} [{f['min']:.1f}–{f['max']:.1f}]"
        lines.append(f"| {s['scenario']} | {s['cipher']} | {s['unit']} | {cell(s['ingestion'])} | "
                     f"{cell(s['OpenSSH'])} | {s['ratio']['median']:.2f} [{s['ratio']['min']:.2f}–{s['ratio']['max']:.2f}] |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
