"""Synthetic data: distillation, backtranslation and verification in a sandbox.

  python tools/synthesize.py --mode=distill --ckpt=runs/sft --input=prompts.jsonl --output=distilled.jsonl
  python tools/synthesize.py --mode=verify --input=distilled.jsonl --output=verified.jsonl

  sandbox        run untrusted Python in a contained subprocess (lmstack.synth.sandbox.run_python)
  verify         HumanEval-style checks of generated code (lmstack.synth.verify)
  generate_data  teacher generations for SFT records (lmstack.synth.generate_data)
"""
