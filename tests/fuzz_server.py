"""The fuzzer's case server: imports xray_cls's commands once, then runs each case it is sent in a
forked child process, as `python -m <module> <args>` would run it, under limits.

Started by `fuzzing.CaseServer`. It reads one JSON request per line on stdin and answers one JSON
line on stdout: {"exit": status, "signal": number or null, "timed_out": bool, "seconds": float,
"max_rss_mb": float}. A child:
- runs in its own process group, in the case's folder, with the case's environment;
- may map at most `address_space_mb` more than this server has mapped (RLIMIT_AS);
- is killed (with its group) after `timeout` seconds;
- writes its stdout and stderr to the files the request names.
Forking a process that has already imported torch, Lightning and Hydra costs milliseconds, where a
fresh interpreter costs seconds: that is what makes thousands of cases affordable.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import sys
import time
import traceback

PRELOAD = [
    "xray_cls.train", "xray_cls.evaluate", "xray_cls.predict", "xray_cls.export", "xray_cls.adapt",
    "xray_cls.sweep_report", "xray_cls.data", "lightning.pytorch", "matplotlib.figure", "pydicom", "simplejpeg",
]


def mapped_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(request: dict) -> None:
    """In the forked child: become the command, then leave with its exit status (never return)."""
    status = 1
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        limit = mapped_bytes() + request["address_space_mb"] * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        sys.argv = [request["module"], *request["args"]]
        module, _, function = request["module"].partition(":")
        entry = getattr(importlib.import_module(module), function or "main")
        entry()
        status = 0
    except SystemExit as exit_:  # how the commands end: sys.exit(2) for a user's mistake
        code = exit_.code
        if code is None:
            status = 0
        elif isinstance(code, int):
            status = code
        else:
            print(code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001  an uncaught error: Python prints its traceback and exits 1
        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def serve(request: dict) -> dict:
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        run_child(request)
    deadline = started + request["timeout"]
    timed_out = False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(0.005)
    try:  # what the case left running (a loader worker) goes with it
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return {
        "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "timed_out": timed_out,
        "seconds": round(time.monotonic() - started, 3),
        "max_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def main() -> None:
    for name in PRELOAD + sys.argv[1:]:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps(serve(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
