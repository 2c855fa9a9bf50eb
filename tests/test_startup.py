"""The command line answers help, completion and usage errors before anything heavy loads;
option values that cannot work are refused while parsing; --threads and its defaults."""

import math
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Optional

import pytest
import torch

from bd3 import runtime
from bd3.cli.main import app, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "datasets", "tokenizers")

# Runs the CLI on argv, then reports (even after sys.exit) which heavy modules were imported.
PROBE = (
    "import atexit, sys\n"
    f"atexit.register(lambda: sys.stderr.write('\\nheavy=' + ','.join(m for m in {HEAVY!r} if m in sys.modules)))\n"
    "from bd3.cli.main import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def heavy(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.rsplit("heavy=", 1)[1].strip()


def test_importing_the_cli_imports_nothing_heavy():
    code = f"import sys, bd3.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == ""


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["--help"], 0, "pretrain"),
        (["eval", "--help"], 0, "--zero-shot"),
        (["--version"], 0, "bd3 "),
        (["sampel"], 2, "sample"),
        (["pretrain", "--nope"], 2, "--nope"),
        (["pretrain", "--lr", "inf"], 2, "--lr"),
        (["sample", "--top-p", "0"], 2, "--top-p"),
        (["eval", "--threads", "0"], 2, "--threads"),
        (["pretrain", "--algo", "sedd2"], 2, "--algo"),
        (["sample", "--stop", "never"], 2, "--stop"),
        (["eval", "--zero-shot", "no-such-file.txt"], 2, "no-such-file.txt"),
    ],
)
def test_help_and_usage_errors_answer_without_torch(args, code, needle):
    proc = run_cli(*args)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stdout + proc.stderr and "Traceback" not in proc.stderr
    assert heavy(proc) == ""
    if code == 2:
        assert proc.stderr.startswith("Error:") and len(proc.stderr.split("\nheavy=")[0].strip().splitlines()) == 1


def test_completion_answers_without_torch():
    proc = run_cli(env={"_BD3_COMPLETE": "complete_bash", "COMP_WORDS": "bd3 pre", "COMP_CWORD": "1"})
    assert "pretrain" in proc.stdout and heavy(proc) == ""


def test_console_script_help_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-m", "bd3", "--help"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "finetune" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "bd3", "pretrain", "--threads", "-1"], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--threads" in proc.stderr


def float_options() -> list[tuple[str, str]]:
    """(command, option) for every option of every command that takes one float, read from
    the commands' annotations."""
    found = []
    for info in app.registered_commands:
        for name, hint in typing.get_type_hints(info.callback, include_extras=True).items():
            base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
            if base in (float, Optional[float]):
                found.append((info.name or info.callback.__name__, "--" + name.replace("_", "-")))
    return found


def test_every_float_option_refuses_non_finite_values(capsys):
    options = float_options()
    assert {("pretrain", "--lr"), ("finetune", "--lr"), ("sample", "--top-p"), ("sample", "--temperature"),
            ("eval", "--threshold")} <= set(options)
    for command, option in options:
        for value in ("inf", "-inf", "nan"):
            assert main([command, option, value]) == 2, (command, option, value)
            err = capsys.readouterr().err
            assert option in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval", "sample", "variance"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_threads_below_one_is_a_usage_error(command, value, capsys):
    assert main([command, "--threads", value]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and len(err.strip().splitlines()) == 1


def test_top_p_must_lie_in_the_half_open_unit_interval(capsys):
    for value in ("0", "-0.1", "1.5"):
        assert main(["sample", "--top-p", value]) == 2
        assert "(0, 1]" in capsys.readouterr().err


def test_default_threads_follow_omp_num_threads_then_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runtime.default_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert runtime.default_threads() == runtime.available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert 1 <= runtime.available_cores() <= len(os.sched_getaffinity(0))


def test_cgroup_quota_v2_and_v1(tmp_path):
    assert runtime.cgroup_quota(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert math.isclose(runtime.cgroup_quota(tmp_path), 2.5)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert runtime.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert math.isclose(runtime.cgroup_quota(tmp_path), 1.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert runtime.cgroup_quota(tmp_path) is None


def test_a_loaded_machine_gets_one_note_on_stderr(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a terminal: pipes and logs get no note
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    try:
        assert runtime.use_threads(None) == 2 and torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert "load average (99.0)" in err and "--threads 1" in err and len(err.strip().splitlines()) == 1
        assert runtime.use_threads(1) == 1 and capsys.readouterr().err == ""  # --threads given: no note
        assert runtime.use_threads(None, warn_if_loaded=False) == 2 and capsys.readouterr().err == ""
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        assert runtime.use_threads(None) == 2 and capsys.readouterr().err == ""
        monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
        monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
        assert runtime.use_threads(None) == 2 and capsys.readouterr().err == ""
    finally:
        torch.set_num_threads(before)
