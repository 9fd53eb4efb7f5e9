"""Real `schnet-md` processes for tests: one paused at a chosen point of its work, holding what it holds there."""

from __future__ import annotations

import subprocess
import sys

PAUSED = """
import importlib, sys
module_name, function, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = importlib.import_module(module_name)
real, calls = getattr(module, function), []

def paused(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth:
        print("paused", flush=True)
        sys.stdin.readline()            # the test lets it go on (a line) or kills it
    return real(*args, **kwargs)

setattr(module, function, paused)
from schnet_md.cli import main
sys.exit(main(sys.argv[4:]))
"""


def paused_command(module: str, function: str, nth: int, argv) -> subprocess.Popen:
    """`schnet-md ARGV` in a process of its own, paused at the `nth` call of `module.function` (looked up by the
    command at call time); returns once it is there. Write a line to its stdin to let it go on."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED, module, function, str(nth), *map(str, argv)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "paused":
            return proc
    proc.wait()
    raise AssertionError(f"schnet-md {' '.join(map(str, argv))} ended (exit {proc.returncode}) before the pause: "
                         f"{proc.stderr.read()[-2000:]}")


def go_on(proc: subprocess.Popen, timeout: float = 300) -> int:
    """Let a paused command go on; its exit status."""
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.wait(timeout=timeout)
