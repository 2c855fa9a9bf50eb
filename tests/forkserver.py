"""Run many `bd3` commands without paying Python's and torch's start-up for each.

``python tests/forkserver.py serve SOCKET`` imports bd3's command line once and listens on
the UNIX socket; ``python tests/forkserver.py SOCKET ARGS...`` (the client: standard library
only, so it starts at once) sends its arguments, working folder, environment and its stdin,
stdout and stderr, and exits with the command's exit code. The server forks a child per
command, which takes those file descriptors, folder and environment, runs
``bd3.cli.main.main(ARGS)`` exactly as the `bd3` console script does, and reports the code.
The server also imports, once, what the commands import in their bodies (torch, the model,
training, evaluation, sampling): only imports, never a tensor operation, so each child starts
with no thread pool to inherit.
Tests that drive shell scripts of many `bd3` commands (the recipes) set ``BD3`` to the client.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import sys


# what the commands import after parsing their options
PRELOAD = [
    "torch", "bd3.cli.common", "bd3.train", "bd3.evaluate.perplexity", "bd3.evaluate.zero_shot", "bd3.evaluate.gen_ppl",
    "bd3.evaluate.variance", "bd3.evaluate.report", "bd3.sampling.generate", "bd3.sampling.text", "bd3.runs.records",
]


def serve(path: str) -> None:
    from bd3.cli.main import main

    for module in PRELOAD:  # the expensive imports, done once
        importlib.import_module(module)

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        _, fds, _, _ = socket.recv_fds(conn, 1, 3)
        request = json.loads(conn.makefile("r").readline())
        pid = os.fork()
        if pid == 0:  # the child: become the client's command
            for i, fd in enumerate(fds):
                os.dup2(fd, i)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            code = 1
            try:
                code = main(request["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                conn.sendall(f"{code}\n".encode())
                os._exit(0)
        for fd in fds:
            os.close(fd)
        os.waitpid(pid, 0)
        conn.close()


def client(path: str, argv: list[str]) -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [b"x"], [0, 1, 2])
    request = {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}
    conn.sendall((json.dumps(request) + "\n").encode())
    reply = conn.makefile("r").readline()
    return int(reply) if reply.strip() else 1


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
