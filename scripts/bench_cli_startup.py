"""Time `host --help` and `host plugins list` in fresh processes; prints a table.

Target: each < 0.5 s (median of N runs). Usage: python scripts/bench_cli_startup.py [N]
"""

import shutil
import statistics
import subprocess
import sys
import time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 10
from pathlib import Path

host = str(Path(sys.executable).with_name("host"))  # the venv this script runs in
if not Path(host).exists():
    host = shutil.which("host") or sys.exit("no `host` command found; install host first")
rows = []
for argv in (["--help"], ["plugins", "list"]):
    times = []
    for _ in range(N):
        t = time.perf_counter()
        subprocess.run([host, *argv], check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    rows.append((" ".join(["host", *argv]), statistics.median(times), max(times)))
print(f"{'command':<20} {'median s':>9} {'max s':>7}  target < 0.5 s")
for cmd, med, worst in rows:
    print(f"{cmd:<20} {med:>9.3f} {worst:>7.3f}  {'ok' if med < 0.5 else 'SLOW'}")
