"""One prompt per row: every sampler, batched over prompts of different lengths (and rows
of different lengths), gives each row exactly the tokens it gets alone with the same seed
and sample index; one shared prompt is the same as that prompt given to every row."""

from __future__ import annotations

import pytest

from bd3.config import DataConfig, DiffusionConfig, ModelConfig, RunConfig
from bd3.model import DiT
from bd3.sampling.generate import generate
from tests.conftest import ar_samples as sample_ar
from tests.conftest import block_samples as sample_blocks
from tests.conftest import randomize
from tests.conftest import sedd_samples as sample_sedd

V, MASK, BOS, EOS = 40, 39, 0, 7
KW = dict(length=16, mask_id=MASK, bos_id=BOS, eos_id=EOS, stop="eos")
# BOS alone; a whole block of 4; one block and 2 into the next (with EOS inside the prompt,
# which ends nothing); two whole blocks and 2 into the third
PROMPTS = [[BOS], [BOS, 5, 6, 8], [BOS, 3, 4, 7, 6, 9], [BOS, 3, 4, 5, 6, 8, 9, 10, 11, 12]]
ENDS = [3, 5, 30, 21]  # the first two rows end before the last two leave their prompts; two pass the model length (16)


def alone(sampler, model, i, **kw):
    """Row i by itself: its prompt, its length, its sample index."""
    return sampler(model, samples=[i], prompt=PROMPTS[i], max_tokens=ENDS[i], **kw)[0]


def assert_rows_alone(sampler, model, *, both_stops: bool = True, **kw):
    events = []
    together = sampler(model, prompts=PROMPTS, max_tokens=ENDS, on_block=events.append, **kw)
    assert [s.index for s in together] == [0, 1, 2, 3]
    for i, s in enumerate(together):
        a = alone(sampler, model, i, **kw)
        assert (s.tokens, s.stop, s.nfe, s.prompt_tokens) == (a.tokens, a.stop, a.nfe, a.prompt_tokens), i
        assert s.tokens[: len(PROMPTS[i])] == PROMPTS[i] and s.prompt_tokens == len(PROMPTS[i]) and MASK not in s.tokens
        assert (s.stop == "eos" and s.tokens[-1] == EOS) or (s.stop == "length" and len(s.tokens) == ENDS[i])
        # what the row streams is exactly its new tokens
        streamed = [t for e in events for j, new in zip(e.samples, e.new_tokens) if j == i for t in new]
        assert streamed == s.tokens[s.prompt_tokens :]
    if both_stops:  # some rows stop at EOS, others at their length
        assert {s.stop for s in together} == {"eos", "length"}


@pytest.mark.parametrize("rule", ["first-hitting", "ddpm", "threshold"])
@pytest.mark.parametrize("kv_cache", [True, False])
def test_block_sampler_rows_are_their_own(tiny_model, rule, kv_cache):
    assert_rows_alone(sample_blocks, tiny_model, block_size=4, rule=rule, threshold=0.3, kv_cache=kv_cache, seed=3, **KW)


def test_mdlm_rows_are_their_own(tiny_model):
    assert_rows_alone(sample_blocks, tiny_model, block_size=8, mdlm=True, seed=4, **KW)


@pytest.mark.parametrize("top_p", [0.0, 0.9])
def test_ar_rows_are_their_own(tiny_cfg, top_p):
    model = randomize(DiT(ModelConfig(**{**tiny_cfg.__dict__, "causal": True}), V))
    # draws come 4 at a time from each row's first new token, whatever the other rows' prompts
    assert_rows_alone(sample_ar, model, report_every=4, top_p=top_p, seed=2, **KW)


@pytest.mark.parametrize("steps", [None, 3])
def test_sedd_rows_are_their_own(tiny_model, steps):
    """Without ``steps`` each row runs T = its own positions: its own grid and time input."""
    assert_rows_alone(sample_sedd, tiny_model, steps=steps, seed=5, both_stops=False, **KW)


def test_one_prompt_for_all_rows_is_that_prompt_per_row(tiny_model):
    for sampler, kw in ((sample_blocks, dict(block_size=4)), (sample_sedd, {})):
        shared = sampler(tiny_model, batch=3, prompt=PROMPTS[2], max_tokens=20, seed=1, **kw, **KW)
        each = sampler(tiny_model, prompts=[PROMPTS[2]] * 3, max_tokens=[20] * 3, seed=1, **kw, **KW)
        assert [s.tokens for s in shared] == [s.tokens for s in each]
    with pytest.raises(ValueError, match="not both"):
        sample_blocks(tiny_model, prompt=[BOS], prompts=PROMPTS, max_tokens=20, block_size=4, **KW)
    with pytest.raises(ValueError, match="4 prompts and 3 max_tokens"):
        sample_blocks(tiny_model, prompts=PROMPTS, max_tokens=ENDS[:3], block_size=4, **KW)
    with pytest.raises(ValueError, match="must exceed the prompt"):
        sample_ar(tiny_model, prompts=PROMPTS, max_tokens=[20, 20, 6, 20], **KW)


@pytest.mark.parametrize("algo", ["bd3lm", "mdlm", "sedd"])
def test_generate_with_prompts_and_streams(tiny_model, tiny_cfg, algo):
    """generate(prompts=...) in batches of 3, every sample from stream 0, equals each prompt
    through generate alone (sample 0)."""
    config = RunConfig(model=tiny_cfg, diffusion=DiffusionConfig(algo=algo, block_size=16 if algo != "bd3lm" else 4),
                       data=DataConfig(vocab_size=V, mask_id=MASK, bos_id=BOS, eos_id=EOS, pad_id=MASK - 1))
    kw = dict(seed=8, batch_size=3)
    together = generate(tiny_model, config, prompts=PROMPTS, max_tokens=ENDS, streams=[0] * 4, **kw)
    for i, s in enumerate(together):
        assert s.tokens == generate(tiny_model, config, prompt=PROMPTS[i], max_tokens=ENDS[i], **kw)[0].tokens
    with pytest.raises(ValueError, match="streams has 2 entries for 4 samples"):
        generate(tiny_model, config, prompts=PROMPTS, max_tokens=20, streams=[0, 0])
