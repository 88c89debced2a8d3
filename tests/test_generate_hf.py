"""Greedy generation token-identical to transformers' `generate`.

Tiny random Llama, Mistral (sliding window) and Qwen2 models are built here
with transformers, saved as safetensors, imported, and decoded in one ragged
batch by lmstack's KV-cache decoder; each prompt's 32 new tokens must equal
what transformers generates for that prompt alone.
"""

import dataclasses

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmstack.convert import hf  # noqa: E402
from lmstack.model.generate import generate  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.3)
MODELS = {
    "llama": transformers.LlamaConfig,
    "mistral": lambda **kw: transformers.MistralConfig(sliding_window=12, **kw),
    "qwen2": transformers.Qwen2Config,
}
PROMPTS = [[5, 17, 200, 3, 99, 42, 7, 8, 150, 11], [60, 61], [1, 2, 3, 4, 5]]


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_greedy_generation_matches_transformers(arch, tmp_path):
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(MODELS[arch](**TINY), attn_implementation="eager",
                                                        dtype=torch.float32).eval()
  with torch.no_grad():  # q/k/v biases start at zero in Qwen2: make them count
    for name, p in model.named_parameters():
      if name.endswith("bias"):
        p.normal_(0, 0.3)
  model.save_pretrained(tmp_path, safe_serialization=True)

  cfg = dataclasses.replace(hf.hf_to_model_config(hf.read_hf_config(str(tmp_path))), dtype="float32")
  ours = generate(hf.model_from_params(hf.load_hf_params(str(tmp_path), cfg), cfg), PROMPTS, max_new_tokens=32)

  for prompt, got in zip(PROMPTS, ours):
    with torch.no_grad():
      out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    want = out[0, len(prompt):].tolist()
    assert len(want) == 32
    assert got == want
  assert len({tuple(o) for o in ours}) == len(PROMPTS)  # the prompts lead to different text
