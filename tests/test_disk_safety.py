"""Never lose a user's files: what --force may replace, refused commands that change nothing,
and writes that fail (unwritable paths, full disks, a closed or full stdout) as one line."""

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from bd3.cli.main import main
from bd3.runs import Run
from tests import test_reliability
from tests.conftest import tree

TRAIN = ["--data", "web", "--length", "32", "--batch-size", "4", "--device", "cpu", "--precision", "fp32",
         "--block-size", "8", "--eval-batches", "1", "--log-every", "1"]
FULL = OSError(errno.ENOSPC, "No space left on device")
trained = test_reliability.trained  # a finished 1-step run, built once for both modules' tests


@pytest.fixture
def workdir(tmp_path, monkeypatch, trained):
    """A working folder holding a copy of a finished 1-step run (test_reliability's) as
    runs/good, and files of the user's."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained, tmp_path / "runs" / "good")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.txt").write_text("precious")
    return tmp_path


def one_error_line(err: str, *needles: str) -> None:
    """``err`` ends with one error line holding ``needles`` (after the progress lines of a run
    that started, or the name of the newest run); no traceback."""
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines, err
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], err
    err = lines[-1]
    for needle in needles:
        assert needle in err, err


REFUSALS = [
    # (arguments, run from (relative to the working folder), text the message must contain)
    (["pretrain", *TRAIN, "--steps", "1", "--out", ".", "--force"], ".", "current folder"),
    (["pretrain", *TRAIN, "--steps", "1", "--out", "..", "--force"], "runs/good/checkpoints", "current folder"),
    (["pretrain", *TRAIN, "--steps", "1", "--out", "runs", "--force"], ".", "not a bd3 run directory"),
    (["pretrain", *TRAIN, "--steps", "1", "--out", "mine", "--force"], ".", "not a bd3 run directory"),
    (["pretrain", *TRAIN, "--steps", "1", "--out", "notes.txt", "--force"], ".", "not a folder"),
    (["pretrain", *TRAIN, "--steps", "1", "--out", "runs/good"], ".", "--force"),
    (["finetune", "runs/good", "--block-size", "4", "--steps", "1", "--device", "cpu", "--out", "runs/good", "--force"], ".",
     "being fine-tuned"),
    (["pretrain", "--resume", "--out", "runs/good"], ".", "--steps"),
    (["finetune", "--resume", "--out", "runs/good", "--steps", "1"], ".", "--steps"),
    (["pretrain", "--resume"], ".", "--steps"),  # the newest run, finished
    (["export", "runs/good", "runs/good", "--force"], ".", "run directory"),
    (["export", "runs/good", "mine"], ".", "--force"),
    (["tokenize", "--data", "web", "--length", "32", "--out", "mine", "--force"], ".", "not a bd3 shard folder"),
]


@pytest.mark.parametrize("args,cwd,needle", REFUSALS, ids=[" ".join(a for a in r[0] if a not in TRAIN) for r in REFUSALS])
def test_refusals_change_nothing_on_disk(workdir, monkeypatch, capsys, args, cwd, needle):
    before = tree(workdir)
    newest = (workdir / "runs" / "good" / "config.json").stat().st_mtime_ns
    monkeypatch.chdir(workdir / cwd)
    assert main(args) == 1
    err = capsys.readouterr().err
    one_error_line(err, needle)
    assert len([line for line in err.splitlines() if not line.startswith("Using the newest run")]) == 1, err
    assert tree(workdir) == before
    assert (workdir / "runs" / "good" / "config.json").stat().st_mtime_ns == newest  # still not the "newest" run


def test_force_replaces_a_run_only_once_the_new_one_has_its_files(workdir, monkeypatch, capsys):
    run = workdir / "runs" / "good"
    before = tree(run)
    real = Path.write_text

    def fail_on_tokenizer(self, *a, **k):
        if self.name == "tokenizer.json":
            raise FULL
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", fail_on_tokenizer)
    assert main(["pretrain", *TRAIN, "--steps", "2", "--out", "runs/good", "--force"]) == 1
    one_error_line(capsys.readouterr().err, "runs/good", "No space left", "free some space")
    assert tree(run) == before  # the old run is whole, and no half-built folder is left beside it
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["good"]

    monkeypatch.setattr(Path, "write_text", real)
    assert main(["pretrain", *TRAIN, "--steps", "2", "--out", "runs/good", "--force"]) == 0
    assert [p.name for p in Run.open(run).checkpoints()] == ["step-00000002"]
    assert sorted(p.name for p in (workdir / "runs").iterdir()) == ["good"]


def test_resume_extends_a_finished_run(workdir):
    run = workdir / "runs" / "good"
    assert main(["pretrain", "--resume", "--out", str(run), "--steps", "2"]) == 0
    records = Run.open(run).metrics()
    assert [r["step"] for r in records if r.get("event") == "summary"] == [2]  # the old summary is replaced
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2


def test_a_run_without_a_checkpoint_is_skipped_and_cannot_be_resumed(workdir, monkeypatch, capsys):
    young = workdir / "runs" / "young"
    young.mkdir()
    shutil.copy(workdir / "runs" / "good" / "config.json", young / "config.json")
    shutil.copy(workdir / "runs" / "good" / "tokenizer.json", young / "tokenizer.json")
    (young / "checkpoints" / ".tmp-step-00000001-1").mkdir(parents=True)  # killed during its first save
    before = tree(workdir)

    assert main(["sample", "--max-tokens", "12", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "Using the newest run: runs/good" in err and "skipped runs/young" in err

    assert main(["pretrain", "--resume", "--out", "runs/young", "--steps", "3"]) == 1
    one_error_line(capsys.readouterr().err, "runs/young", "no complete checkpoint", "--force")
    assert tree(workdir) == before

    assert main(["pretrain", *TRAIN, "--steps", "1", "--out", "runs/young", "--force"]) == 0  # what the message says
    assert Run.open(young).checkpoints()


def test_unwritable_paths_are_one_line(workdir, monkeypatch, capsys):
    for args, needle in [
        (["pretrain", *TRAIN, "--steps", "1", "--out", "/proc/bd3-run"], "/proc/bd3-run"),
        (["export", "runs/good", "/proc/bd3-export"], "/proc/bd3-export"),
        (["tokenize", "--data", "web", "--length", "32", "--out", "/proc/bd3-shards"], "/proc/bd3-shards"),
    ]:
        assert main(args) == 1
        one_error_line(capsys.readouterr().err, needle, "Could not write")
    monkeypatch.setenv("BD3_CACHE_DIR", "/proc/bd3-cache")
    assert main(["pretrain", *TRAIN, "--length", "24", "--steps", "1", "--out", "fresh"]) == 1
    one_error_line(capsys.readouterr().err, "/proc/bd3-cache", "BD3_CACHE_DIR")
    assert not (workdir / "fresh").exists()


def test_a_read_only_run_is_refused_before_resuming(workdir, monkeypatch, capsys):
    import bd3.paths

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    before = tree(workdir)
    monkeypatch.setattr(bd3.paths.tempfile, "TemporaryFile", read_only)
    assert main(["pretrain", "--resume", "--out", "runs/good", "--steps", "3"]) == 1
    one_error_line(capsys.readouterr().err, "runs/good/checkpoints", "Read-only file system")
    assert tree(workdir) == before


def test_free_space_is_checked_before_the_first_step(workdir, monkeypatch, capsys):
    import bd3.paths

    monkeypatch.setattr(bd3.paths.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 1 << 20))
    before = tree(workdir)
    assert main(["pretrain", *TRAIN, "--model", "tiny", "--steps", "1", "--out", "big"]) == 1
    one_error_line(capsys.readouterr().err, "MiB free", "one checkpoint needs about")
    assert main(["pretrain", "--resume", "--out", "runs/good", "--steps", "3"]) == 1
    one_error_line(capsys.readouterr().err, "MiB free")
    assert tree(workdir) == before  # no run folder made, the resumed run untouched


def test_a_full_disk_during_a_checkpoint_leaves_no_temporary_folder(workdir, monkeypatch, capsys):
    import bd3.runs.rundir as rundir

    real, calls = rundir.save_file, [0]

    def full_disk(*a, **k):  # what safetensors raises: its own error type, the OS error in the text
        calls[0] += 1
        if calls[0] > 3:  # the second checkpoint
            raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')
        return real(*a, **k)

    monkeypatch.setattr(rundir, "save_file", full_disk)
    assert main(["pretrain", *TRAIN, "--steps", "2", "--save-every", "1", "--out", "full"]) == 1
    one_error_line(capsys.readouterr().err, "step-00000002", "No space left on device", "step-00000001", "--resume")
    run = Run.open(workdir / "full")
    assert [p.name for p in run.checkpoints()] == ["step-00000001"]
    assert [p.name for p in (run.path / "checkpoints").iterdir()] == ["step-00000001"]


def test_a_full_disk_while_tokenizing_leaves_no_temporary_folder(workdir, monkeypatch, capsys):
    import bd3.data.shards as shards

    def full(*a, **k):
        raise FULL

    monkeypatch.setattr(shards, "_write_json", full)
    (workdir / "corpus.txt").write_text("".join(f"Paragraph {i} of a small corpus, long enough for a row or two.\n\n" for i in range(400)))
    assert main(["tokenize", "--data", "corpus.txt", "--tokenizer", "gpt2", "--length", "32", "--out", "out/shards"]) == 1
    one_error_line(capsys.readouterr().err, "out/shards", "No space left", "free some space")
    assert list((workdir / "out").iterdir()) == []


def bd3_process(*args, cwd: Path, stdout) -> subprocess.CompletedProcess:
    code = "import sys; from bd3.cli.main import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=300)


def test_a_full_stdout_is_one_line(workdir):
    with open("/dev/full", "w") as full:
        done = bd3_process("sample", "runs/good", "--max-tokens", "40", "--device", "cpu", cwd=workdir, stdout=full)
    assert done.returncode == 1
    one_error_line(done.stderr, "standard output", "No space left on device")


def test_sample_refuses_more_tokens_than_memory_holds(workdir, capsys):
    assert main(["sample", "runs/good", "--max-tokens", "10000000000", "--device", "cpu"]) == 2
    one_error_line(capsys.readouterr().err, "--max-tokens", "GiB", "at most")


def test_a_full_stdout_of_eval_tables_is_one_error(monkeypatch):
    from bd3.cli.common import print_table
    from bd3.errors import Bd3Error

    for as_json in (True, False):
        with open("/dev/full", "w") as full:  # (once failed, the stream is pointed at /dev/null)
            monkeypatch.setattr(sys, "stdout", full)
            with pytest.raises(Bd3Error, match="Could not write standard output: No space left on device"):
                print_table("NELBO", [{"ppl": 1.5}], [("ppl", "perplexity")], as_json, {"ppl": 1.5})


def test_a_disk_that_fills_during_training_is_one_line(workdir, monkeypatch, capsys):
    real = Run.log

    def log(self, record):
        if record.get("step") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "metrics.jsonl"))
        real(self, record)

    monkeypatch.setattr(Run, "log", log)
    assert main(["pretrain", *TRAIN, "--steps", "3", "--out", "filling"]) == 1
    one_error_line(capsys.readouterr().err, "filling/metrics.jsonl", "No space left on device", "free some space")


@pytest.mark.parametrize("num_samples,block_size", [(1, 1), (3, 4), (8, 16)])
def test_max_sample_tokens_is_the_largest_that_fits(num_samples, block_size):
    from bd3.sampling.generate import max_sample_tokens, sample_memory

    memory = 7 * 2**30 + 12345
    most = max_sample_tokens(memory, num_samples, block_size)
    assert sample_memory(num_samples, most, block_size) <= memory < sample_memory(num_samples, most + block_size, block_size)
