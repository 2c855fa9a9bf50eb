"""Run many `bd3` commands without paying Python's and torch's start-up for each.

``python tests/forkserver.py serve SOCKET`` imports bd3 and torch once and listens on the
UNIX socket; ``python tests/forkserver.py SOCKET ARGS...`` (the client: standard library
only, so it starts at once) sends its arguments, working folder, environment and its stdin,
stdout and stderr, and exits with the command's exit code. The server forks a child per
command, which takes those file descriptors, folder and environment, runs the `bd3` console
script's entry point (``bd3.cli.main.run``) on ARGS, and reports the exit code.
``python tests/forkserver.py SOCKET -c CODE ARGS...`` runs CODE as ``python -c CODE ARGS...``
would instead (a test's patch, then ``main``).

The server imports, once, what the commands import in their bodies (torch, the model,
training, evaluation, sampling): only imports, never a tensor operation, so each child starts
with no thread pool to inherit. Commands run concurrently (the processes of a torchrun-style
launch). The client stands for its command: SIGTERM and SIGINT sent to it reach the command,
and a client that dies, however it dies, takes its command with it.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import sys
import threading
import traceback

BD3 = "from bd3.cli.main import run; run()"  # the `bd3` console script
# what the commands import after parsing their options
PRELOAD = [
    "torch", "bd3.cli.main", "bd3.cli.common", "bd3.train", "bd3.evaluate.perplexity", "bd3.evaluate.zero_shot",
    "bd3.evaluate.gen_ppl", "bd3.evaluate.variance", "bd3.evaluate.report", "bd3.sampling.generate", "bd3.sampling.text",
    "bd3.runs.records",
]


def serve(path: str) -> None:
    for module in PRELOAD:  # the expensive imports, done once
        importlib.import_module(module)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    signal.signal(signal.SIGCHLD, _reap)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = json.loads(conn.makefile("r").readline())
        if os.fork() == 0:  # the child: become the client's command, report its exit code, exit
            status = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                conn.sendall(f"{os.getpid()}\n".encode())
                threading.Thread(target=_die_with_client, args=(conn,), daemon=True).start()
                status = _run(fds, request)
            finally:
                try:
                    conn.sendall(f"{status}\n".encode())
                finally:
                    os._exit(0)  # never back into the server's loop
        for fd in fds:
            os.close(fd)
        conn.close()


def _run(fds: list[int], request: dict) -> int:
    """Run the request as a fresh `python -c` would; its exit status."""
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:  # read at start-up by a fresh process
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    argv = request["argv"]
    code, sys.argv = (argv[1], argv[1:]) if argv[:1] == ["-c"] else (BD3, ["-c", *argv])
    status = 1
    try:
        exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
        status = 0
    except SystemExit as e:  # as the interpreter turns it into an exit status
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()  # as the interpreter does with an uncaught exception
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        status = 120  # as the interpreter, when it cannot flush its streams at exit
    return status


def _die_with_client(conn: socket.socket) -> None:
    """The client sends nothing more: the connection ends only when the client is gone."""
    conn.recv(1)
    os.kill(os.getpid(), signal.SIGKILL)


def _reap(*_) -> None:
    """Collect the commands that have finished."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def client(path: str, argv: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [b"x"], [0, 1, 2])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    conn.sendall((json.dumps(request) + "\n").encode())
    reply = conn.makefile("r")
    command = reply.readline()
    if not command.strip():
        return 1  # the command died before it started
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, _: os.kill(int(command), signum))
    code = reply.readline()
    return int(code) if code.strip() else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
