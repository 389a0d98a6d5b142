"""Behaves like accelerate's launcher for the supervisor tests: runs `python SCRIPT ARGS` as a
child, reports any non-zero status of it as 1, and has no SIGUSR1 handler of its own."""

import subprocess
import sys

status = subprocess.call([sys.executable, *sys.argv[1:]])
sys.exit(0 if status == 0 else 1)
