"""One vocabulary per option across the commands: --precision, --clip, --denoise-steps, and
the old spellings that keep working for one release with a one-line note."""

import pytest

from bd3.choices import COMMAND_PRECISIONS
from bd3.cli.main import main
from bd3.cli.options import upgrade_argv
from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig, TrainConfig, parse_clip
from bd3.errors import Bd3Error


def bd3(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny random-weight bd3lm run with the shipped BPE tokenizer."""
    from bd3.data.tokenizer import load_tokenizer
    from bd3.model import DiT
    from bd3.runs import Run
    from tests.conftest import randomize

    tok = load_tokenizer("bpe")
    data = DataConfig(data="web", tokenizer="bpe", tokenizer_sha256=tok.sha256, **tok.special_ids())
    cfg = RunConfig(model=ModelConfig(hidden_dim=32, n_heads=2, n_layers=2, cond_dim=16, length=32),
                    diffusion=DiffusionConfig(block_size=8), data=data, train=TrainConfig(steps=1))
    r = Run.create(tmp_path_factory.mktemp("options") / "run", cfg, tok.to_json())
    sd = randomize(DiT(cfg.model, data.vocab_size), seed=3).state_dict()
    r.save_checkpoint(1, sd, sd, {}, {})
    return r.path


# -- --precision: one list of values, each command taking those that apply to it

def test_every_command_takes_its_values_from_one_vocabulary():
    vocabulary = ("auto", "fp32", "bf16", "fp16")
    assert set(COMMAND_PRECISIONS) == {"pretrain", "finetune", "eval", "variance", "sample", "export"}
    for values in COMMAND_PRECISIONS.values():
        assert set(values) <= set(vocabulary)
    assert COMMAND_PRECISIONS["sample"] == vocabulary


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval", "variance", "sample", "export"])
def test_precision_outside_the_commands_values_is_a_usage_error(command, capsys):
    args = ["export", "run", "out"] if command == "export" else [command]
    code, _, err = bd3(capsys, *args, "--precision", "fp8")
    assert code == 2 and "--precision" in err and ", ".join(COMMAND_PRECISIONS[command]) in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["pretrain", "finetune", "eval", "variance", "sample"])
def test_help_says_what_auto_picks(command, capsys):
    code, out, _ = bd3(capsys, command, "--help")
    out = " ".join(out.split())
    assert code == 0
    assert "auto: " in out and "<" + "|".join(COMMAND_PRECISIONS[command]) + ">" in out


def test_fp16_is_a_sampling_precision_only(capsys):
    code, _, err = bd3(capsys, "pretrain", "--precision", "fp16")
    assert code == 2 and "auto, fp32, bf16 (bd3 pretrain)" in err


# -- --clip BETA,OMEGA everywhere, checked in one place

def test_parse_clip_is_the_config_rule():
    assert parse_clip("0.45,0.95") == (0.45, 0.95)
    assert parse_clip("0.5,0.5") == (0.5, 0.5)
    for bad in ("0.9,0.1", "0.5,1.5", "-0.1,0.5", "0,0", "nan,1", "0.5", "0.1,0.2,0.3", "a,b"):
        with pytest.raises(Bd3Error):
            parse_clip(bad)
    with pytest.raises(Bd3Error, match="--clip 0.45,0.95"):
        DiffusionConfig(clip=(0.9, 0.1))


@pytest.mark.parametrize("command", ["pretrain", "finetune", "variance"])
@pytest.mark.parametrize("clip", ["0.9,0.1", "0.5,1.5", "0.45"])
def test_bad_clip_is_one_usage_line_in_every_command(command, clip, capsys):
    code, _, err = bd3(capsys, command, "--clip", clip)
    assert code == 2 and "--clip" in err and len(err.strip().splitlines()) == 1


def test_old_two_value_clip_is_rewritten_with_a_note(capsys):
    assert upgrade_argv(["finetune", "--clip", "0.45", "0.95", "runs/x"]) == ["finetune", "--clip", "0.45,0.95", "runs/x"]
    assert "--clip 0.45 0.95 is deprecated; write --clip 0.45,0.95" in capsys.readouterr().err
    untouched = ["variance", "--clip", "0.45,0.95", "--clip", "0.3,0.8", "--batch-size", "2"]
    assert upgrade_argv(untouched) == untouched
    assert capsys.readouterr().err == ""
    code, _, err = bd3(capsys, "finetune", "--clip", "0.9", "0.1")  # still checked after the rewrite
    assert code == 2 and "deprecated" in err and "[0.9, 0.1]" in err


# -- the sampler's step count: --denoise-steps (--steps stays the optimiser's)

def test_denoise_steps_old_and_new_spellings_sample_the_same(run, capsys):
    args = ("sample", run, "--max-tokens", 24, "--format", "jsonl", "--device", "cpu", "--precision", "fp32", "--seed", 2)
    code, new, err = bd3(capsys, *args, "--denoise-steps", 3)
    assert code == 0 and "ddpm" in err and "deprecated" not in err
    code, old, err = bd3(capsys, *args, "--steps", 3)
    assert code == 0 and err.splitlines()[0] == "Note: --steps is deprecated; use --denoise-steps (the old name goes in the next release)."
    strip = lambda text: [line.split('"seconds"')[0] for line in text.splitlines()]  # noqa: E731
    assert strip(old) == strip(new)


@pytest.mark.parametrize(
    "args,hint",
    [
        (["--sampler", "first-hitting", "--denoise-steps", "4"], "--denoise-steps"),
        (["--denoise-steps", "4", "--threshold", "0.5"], "--threshold"),
        (["--denoise-steps", "4", "--steps", "4"], "--steps"),
    ],
)
def test_denoise_steps_usage_errors(args, hint, capsys):
    code, _, err = bd3(capsys, "sample", *args)
    assert code == 2 and hint in err


def test_eval_names_denoise_steps(capsys):
    code, _, err = bd3(capsys, "eval", "--tasks", "piqa", "--denoise-steps", "4")
    assert code == 2 and "--denoise-steps:" in err and "does not apply to --tasks" in err
