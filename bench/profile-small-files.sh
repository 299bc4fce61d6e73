#!/usr/bin/env bash
# Profiles 300 x 64 KiB uploads in one sftp session against a release ingestion with a quiet
# pipeline (no scanner answers): wall time, the server's CPU time, and a perf profile (needs perf).
# Usage: bench/profile-small-files.sh [path/to/release/ingestion]   (see bench/results.md)
set -euo pipefail
BIN=$(realpath "${1:-target/release/ingestion}")
W=${WORK:-/tmp/ingestion-profile}; rm -rf $W; mkdir -p $W/users $W/small
ssh-keygen -q -t ed25519 -N "" -f $W/key
PUB=$(cut -d' ' -f1,2 $W/key.pub)
cat > $W/ingestion.toml <<TOML
[admin]
listen = "off"
[server]
listen = "127.0.0.1:2299"
[buckets]
landing = "buckets/landing"
quarantine = "buckets/quarantine"
[users]
dir = "users"
[scanner]
engine = "clamd"
clamd = "tcp://127.0.0.1:9"
[pipeline]
retry_base = "1h"
retry_cap = "1h"
TOML
cat > $W/users/prof.toml <<TOML
username = "prof"
name = "U"
email = "u@example.org"
ssh_keys = ["$PUB"]
allowed_ips = ["127.0.0.1/32"]
destination = "buckets/delivered"
TOML
for i in $(seq 1 300); do head -c 65536 /dev/urandom > $W/small/f$i; done
$BIN serve --config $W/ingestion.toml > $W/serve.log 2>&1 &
PID=$!
sleep 2
SFTP=(sftp -q -b - -B 261120 -R 64 -c aes256-gcm@openssh.com -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=$W/kh -i $W/key -P 2299 prof@127.0.0.1)
# Each run uploads new names into a folder of its own, as bench/bench.py does.
batch() { printf 'mkdir run%s\ncd run%s\nlcd %s\nput *\n' "$1" "$1" "$W/small"; }
batch 0 | "${SFTP[@]}" >/dev/null   # warm-up
cpu() { awk '{print $14+$15}' /proc/$PID/stat; }
switches() { cat /proc/$PID/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
C0=$(cpu); X0=$(switches); T0=$(date +%s.%N)
batch 1 | "${SFTP[@]}" >/dev/null
T1=$(date +%s.%N); C1=$(cpu); X1=$(switches)
echo "wall $(echo "$T1 - $T0" | bc) s, server cpu $(( (C1 - C0) )) ticks (1/100 s)," \
    "$(( X1 - X0 )) context switches (threads alive at the end)"
perf record -F 999 -g -p $PID -o $W/perf.data -- sleep 4 >/dev/null 2>&1 &
PERF=$!
sleep 0.5
batch 2 | "${SFTP[@]}" >/dev/null
wait $PERF
kill $PID
perf report -i $W/perf.data --no-children --sort dso,symbol --stdio 2>/dev/null | grep -v "^#" | grep "%" | head -40
