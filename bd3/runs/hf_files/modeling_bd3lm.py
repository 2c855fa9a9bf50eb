"""A BD3-LM (block discrete diffusion language model) for HuggingFace ``transformers``.

Written by ``bd3 export``. This file depends on the ``bd3`` package, which must be
installed where the model is loaded: the network is bd3's DiT, the same code ``bd3 eval``
and ``bd3 sample`` run, so the logits are bd3's. Class names, weight names and the ``forward`` signature are those of the
released BD3-LM checkpoints (kuleshov-group/bd3lm-owt-block_size4):

    model = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
    logits = model(torch.cat([x_t, x_0], dim=1))    # 2L tokens -> (B, L, V) logits of x_t
    logits = model(x, sample_mode=True)             # up to L tokens, block-causal -> (B, S, V)

With 2L input ids (the noisy sequence x_t, then the clean x_0) the forward is the training
pass under the block-diffusion mask and returns the logits of x_t; with at most L ids it
attends block-causally (a token sees its own block and the earlier ones), as the released
model does with ``sample_mode=True``. The logits are raw (the mask token is not excluded).
Time conditioning is off (``timesteps`` are ignored, as in the released model). KV-cached
sampling runs through ``bd3 sample`` or ``bd3.sampling.generate``; this model has no cache.
"""

import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from bd3.runs.hf import backbone_from_layout, layout_logits

from .configuration_bd3lm import BD3LMConfig


class BD3LM(PreTrainedModel):
    config_class = BD3LMConfig
    base_model_prefix = "bd3lm"
    _keep_in_fp32_modules = ["rotary_emb"]  # the rotary frequencies, whatever the weights' dtype

    def __init__(self, config: BD3LMConfig):
        super().__init__(config)
        self.backbone = backbone_from_layout(config.to_dict())
        self.register_buffer("sampling_eps_min", torch.tensor(float(config.sampling_eps_min)))
        self.register_buffer("sampling_eps_max", torch.tensor(float(config.sampling_eps_max)))
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from model.safetensors; bd3's DiT initialises itself."""

    def forward(self, input_ids=None, timesteps=None, sample_mode=None, store_kv=None, output_hidden_states=None, return_dict=None):
        if store_kv:
            raise ValueError("this model keeps no KV cache; sample with `bd3 sample` or bd3.sampling.generate")
        if output_hidden_states:
            raise ValueError("this model returns logits only")
        dtype = self.backbone.vocab_embed.embedding.dtype  # bf16 weights compute under bf16 autocast
        with torch.autocast(input_ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = layout_logits(self.backbone, input_ids, self.config.block_size, sample_mode=bool(sample_mode))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return MaskedLMOutput(logits=logits) if return_dict else logits
