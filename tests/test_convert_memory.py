"""The Hugging Face import never holds the whole model in host memory.

tracemalloc sees NumPy's host buffers (not XLA's device buffers), i.e. what
the importer reads and converts before placing each tensor on its devices.
"""

import tracemalloc

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lmstack.convert import hf  # noqa: E402


@pytest.mark.slow
def test_import_peak_host_memory_is_a_fraction_of_the_model(tmp_path):
  config = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                                    num_attention_heads=4, num_key_value_heads=4)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="2MB")
  model_bytes = sum(p.numel() for p in model.parameters()) * 4
  del model
  cfg = hf.hf_to_model_config(hf.read_hf_config(str(tmp_path)), dtype="float32")

  tracemalloc.start()
  params = hf.load_hf_params(str(tmp_path), cfg)
  kept, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert sum(x.size for x in __import__("jax").tree.leaves(params)) * 4 == model_bytes
  # On CPU, device_put may alias an aligned NumPy buffer instead of copying
  # it, so the returned parameters themselves can be counted (`kept`); what
  # the import needs beyond them is the transient part. The largest single
  # stacked parameter (8 layers of one MLP matrix) is 0.21 of the model; two
  # full copies would be 2.0.
  transient = peak - kept
  print(f"host memory: peak {peak / model_bytes:.3f}, kept {kept / model_bytes:.3f}, "
        f"transient {transient / model_bytes:.3f} of the float32 model")
  assert transient < 0.6 * model_bytes, (peak, kept, model_bytes)
