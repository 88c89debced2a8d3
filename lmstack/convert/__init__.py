"""Checkpoint conversion between lmstack and other formats.

`lmstack.convert.hf`: Hugging Face Llama-family checkpoints (Llama, Mistral,
Qwen2) to and from lmstack params; the command line is tools/convert_hf.py.
"""
