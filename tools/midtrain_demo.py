"""Mid-training on the shipped data: WSD pre-training, annealing, souping.

  python tools/midtrain_demo.py --workdir=/tmp/midtrain_demo   # ~15 min on 2 CPU cores

One small model (d_model 128, 4 layers, 8,192-token vocabulary: 3M
parameters), every run through lmstack.train.trainer.run:

  1. pre-train with WSD on the corpus, stable phase only (warmup, then a
     constant learning rate: decay_fraction=0, so the run can be extended and
     any of its checkpoints annealed); its last checkpoint is S.
  2. from S, for the same T tokens each (T = --fraction of S's tokens):
     continue  the stable phase on the pre-training corpus (the same workdir,
               more steps: it resumes with the same data order and lr)
     decay     configs/anneal.py on the pre-training corpus alone: the LR decay
               without the new data
     anneal    configs/anneal.py on the quality mix (Python docs, SymPy docs,
               WordNet glosses, 30% pre-training corpus), seeds 0, 1, 2
     soup      tools/soup.py: the uniform average of the three anneals
  3. the held-out loss (nats/token) of each on every source's held-out split
     (lmstack/data/mixture.py), printed as a table and written to
     WORKDIR/table.md.

Acceptance: the anneal lowers the loss on the quality sources more than
continuing the stable phase, and the soup is at least as good as the mean of
its parts. Re-running with the same --workdir reuses finished runs.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
# pylint: disable=g-import-not-at-top
from configs import anneal, common, pretrain

QUALITY = ("python_docs", "sympy_docs", "wordnet")
COLUMNS = QUALITY + ("pretrain",)


def _quiet(config, steps):
  config.train.update(steps=steps, eval_every=0, peak_flops=0.0, tensorboard=False, report_unigram=False,
                      log_every=25, checkpoint_every=steps, keep_checkpoints=20)
  return config


def _train(config, workdir):
  from lmstack.train import trainer
  t = time.perf_counter()
  trainer.run(config, workdir)
  return time.perf_counter() - t


class HeldOut:
  """Held-out loss per mixture source, the batches made once for every model."""

  def __init__(self, tokenizer_path, seq_len, batch_size):
    from lmstack.data import mixture
    from lmstack.data.tokenizer import load_tokenizer
    data = common.mixture_data({name: 1.0 for name in COLUMNS}, tokenizer_path)
    tok = load_tokenizer(tokenizer_path)
    self.batches = {name: list(mixture.make_mixture_dataset(mixture.only_source(data, name), tok, seq_len=seq_len,
                                                            batch_size=batch_size, seed=0, split="eval"))
                    for name in COLUMNS}
    self._eval = {}

  def losses(self, path):
    import jax
    from flax import nnx
    from lmstack import checkpoint as ckpt_lib
    from lmstack.train import losses
    params, cfg, _ = ckpt_lib.restore_params(path)
    graphdef, state = nnx.split(ckpt_lib.model_from_params(params, cfg))
    if cfg not in self._eval:
      self._eval[cfg] = jax.jit(lambda s, b: losses.next_token_loss(nnx.merge(graphdef, s), b)[:2])
    out = {}
    for name, batches in self.batches.items():
      total, weight = 0.0, 0.0
      for batch in batches:
        ls, w = self._eval[cfg](state, batch)
        total, weight = total + float(ls), weight + float(w)
      out[name] = total / weight
    out["quality"] = sum(out[q] for q in QUALITY) / len(QUALITY)
    out["tokens"] = {name: int(sum((b["segment_ids"] > 0).sum() for b in bs)) for name, bs in self.batches.items()}
    return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--d_model", type=int, default=128)
  parser.add_argument("--n_layers", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--pretrain_steps", type=int, default=200, help="stable-phase steps before S")
  parser.add_argument("--lr", type=float, default=2e-3)
  parser.add_argument("--fraction", type=float, default=0.25, help="T as a fraction of S's tokens")
  parser.add_argument("--seeds", type=int, default=3)
  args = parser.parse_args(argv)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  start = time.perf_counter()
  times = {}

  # ---- 1. WSD pre-training, stable phase ----
  def pretrain_config(steps):
    c = pretrain.get_config()
    heads = max(1, args.d_model // 32)
    c.model.update(d_model=args.d_model, n_layers=args.n_layers, n_heads=heads, n_kv_heads=heads,
                   mlp_dim=3 * args.d_model, max_seq_len=args.seq_len, scan_layers=False)
    c.train.update(batch_size=args.batch_size, seq_len=args.seq_len)
    c.optim.update(schedule="wsd", decay_fraction=0.0, lr=args.lr, warmup_steps=min(20, s_steps // 5))
    return _quiet(c, steps)

  pre = os.path.join(root, "pretrain")
  s_steps = args.pretrain_steps
  times["pretrain"] = _train(pretrain_config(s_steps), pre)
  stable = os.path.join(pre, "checkpoints", str(s_steps))

  # ---- 2. Four ways to spend T more tokens ----
  runs = {"stable checkpoint S": stable}
  anneal_arg = f"init_from={stable},fraction={args.fraction}"
  t_steps = anneal.get_config(anneal_arg).train.steps

  # (a) continue the stable phase: the same workdir, more steps (it resumes).
  cont = pretrain_config(s_steps + t_steps)
  times["continue"] = _train(cont, pre)
  runs["continue stable (a)"] = os.path.join(pre, "checkpoints", str(s_steps + t_steps))

  # (a') the same LR decay on the pre-training corpus alone.
  decay = _quiet(anneal.get_config(anneal_arg), t_steps)
  for name in decay.data.sources:
    decay.data.sources[name].weight = 1.0 if name == "pretrain" else 0.0
  times["decay"] = _train(decay, os.path.join(root, "decay_pretrain"))
  runs["decay on corpus only (a')"] = os.path.join(root, "decay_pretrain")

  # (b) anneal on the quality mix, several data orders.
  seeds = []
  for seed in range(args.seeds):
    work = os.path.join(root, f"anneal_seed{seed}")
    times[f"anneal{seed}"] = _train(_quiet(anneal.get_config(f"{anneal_arg},seed={seed}"), t_steps), work)
    runs[f"anneal seed {seed} (b)"] = work
    seeds.append(work)

  # (c) the soup of the anneals.
  from soup import write_soup  # tools/soup.py
  soup_dir = os.path.join(root, "soup")
  if not os.path.isdir(soup_dir):
    write_soup(seeds, soup_dir)
  runs[f"soup of {args.seeds} anneals (c)"] = soup_dir

  # ---- 3. Held-out losses ----
  tok_path = decay.data.tokenizer
  held = HeldOut(tok_path, args.seq_len, args.batch_size)
  results = {name: held.losses(path) for name, path in runs.items()}
  anneals = [results[f"anneal seed {s} (b)"] for s in range(args.seeds)]
  mean = {k: sum(r[k] for r in anneals) / len(anneals) for k in COLUMNS + ("quality",)}

  tokens_per_step = args.batch_size * args.seq_len
  lines = [f"S = {s_steps} steps x {tokens_per_step} tokens = {s_steps * tokens_per_step:,} tokens "
           f"(WSD stable phase, lr {args.lr}); T = {t_steps} steps = {t_steps * tokens_per_step:,} tokens "
           f"({args.fraction:g} of S)",
           "held-out tokens: " + ", ".join(f"{k} {v:,}" for k, v in anneals[0]["tokens"].items()), "",
           "| model | " + " | ".join(COLUMNS) + " | quality mean |", "|---" * (len(COLUMNS) + 2) + "|"]
  rows = list(results.items())
  rows.insert(len(rows) - 1, (f"mean of the {args.seeds} anneals", mean))
  for name, r in rows:
    lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4f}" for k in COLUMNS) + f" | {r['quality']:.4f} |")
  soup_r, cont_r = results[f"soup of {args.seeds} anneals (c)"], results["continue stable (a)"]
  stable_r = results["stable checkpoint S"]
  lines += ["",
            f"quality-source loss change from S: anneal (mean) {mean['quality'] - stable_r['quality']:+.4f}, "
            f"continue stable {cont_r['quality'] - stable_r['quality']:+.4f} -> anneal better: "
            f"{mean['quality'] < cont_r['quality']}",
            f"soup {soup_r['quality']:.4f} vs mean of parts {mean['quality']:.4f} (quality mean) -> soup at least as "
            f"good: {soup_r['quality'] <= mean['quality']}; on every column: "
            f"{all(soup_r[k] <= mean[k] for k in COLUMNS)}",
            "wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            + f"; total {time.perf_counter() - start:.0f} s"]
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(root, "table.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"results": results, "mean_of_anneals": mean, "times": times}, f, indent=1)


if __name__ == "__main__":
  main()
