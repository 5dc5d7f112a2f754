"""ScaleBiO (Pan et al., 2024): learn source weights, then retrain with them.

``python -m paper_repro.scalebio.run [--quick] [--out DIR] [--settings ...]``

Settings (float32, as the paper's models; CPU):

* ``digits``: scikit-learn digits in 6 sources with label-noise rates 0, 0,
  0.2, 0.5, 0.8 and 1 (``problems.data_reweighting.digits_sources``), a
  residual MLP with 4 stacked blocks;
* ``text``: the multi-source corpus of ``problems.transformer`` (two clean
  Markov sources, another chain, shuffled and random tokens) with a
  4-layer decoder-only transformer.

For each, per seed: ScaleBiO (the paper's AdamW settings, alpha = 10) learns
the source weights p, with and without LISA (2 of the 4 blocks, redrawn
every 20 steps, independently for u and w). Then, as in the paper, a fresh
model is trained on data resampled with p, and compared with fresh models
trained with uniform sampling, with a loss filter (drop the fraction q of
the training samples with the highest loss under a uniformly trained model,
q in {0.25, 0.5, 0.75} chosen on the validation loss) and on the clean
sources only (an oracle no method knows). Test accuracy (digits) and test
loss (text, nats; the clean chain's entropy rate is the floor).

* ``memory``: the compiled ScaleBiO step of a larger transformer (8 layers,
  width 256): bytes of the state (two models, their optimizer states) and
  XLA's buffer plan (arguments + outputs + temporaries), AdamW against LISA.
* ``sharding``: in a child process with 8 host devices, ScaleBiO + LISA on
  the text task with batches split over the devices and the state FSDP-
  sharded, against one device: agreement, and bytes per device.
* ``overhead``: the ScaleBiO step against its oracle calls (2 Gg + 1 Gf)
  alone, on the text task.

Writes ``results.md``, ``results.json`` and ``summary.png`` to ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from bilevel import lisa, reweighting
from paper_repro._common import options, save, step_and_oracle_ms
from problems import data_reweighting

SETTINGS = ("digits", "text", "memory", "sharding", "overhead")
# A tiny text task for --quick (the tests): it checks the plumbing only.
QUICK_TEXT = dict(num_per_source=64, num_val=32, num_test=32, seq_len=16,
                  dim=16, mlp_dim=32, upper_batch_size=16,
                  lower_batch_size=20)
ALPHA = 10.0
LISA = dict(num_active=2, period=20)
FILTER_FRACTIONS = (0.25, 0.5, 0.75, 0.9)


def _budgets(quick: bool) -> dict:
  if quick:
    return {"digits": dict(steps=300, retrain=300, task={}),
            "text": dict(steps=30, retrain=30, task=QUICK_TEXT)}
  return {"digits": dict(steps=3000, retrain=2000, task={}),
          "text": dict(steps=1500, retrain=1000, task=dict(
              num_per_source=4096))}


def _make_task(setting: str, key, **kwargs):
  if setting == "digits":
    return data_reweighting.digits_sources(key, **kwargs), "blocks"
  return data_reweighting.text_sources_task(key, **kwargs), "layers"


def learn_weights(task, blocks, *, num_steps, use_lisa, key):
  """ScaleBiO's source weights after ``num_steps`` steps, and their path."""
  model_optimizer = optax.adamw(1e-3, weight_decay=5e-4)
  if use_lisa:
    model_optimizer = lisa.lisa_adamw(
        1e-3, weight_decay=5e-4, blocks=blocks,
        num_active=LISA["num_active"], period=LISA["period"])
  solver = bilevel.solvers.scalebio(task.problem,
                                    lower_optimizer=model_optimizer,
                                    penalty=ALPHA)
  start = time.perf_counter()
  result = bilevel.run(solver, task.x0, task.y0, task.data,
                       num_steps=num_steps, key=key,
                       steps_per_chunk=min(num_steps, 500))
  seconds = time.perf_counter() - start
  weights = np.asarray(result.history.weights)
  every = max(1, num_steps // 50)
  return {"weights": weights[-1].tolist(),
          "path": weights[::every].tolist(), "seconds": seconds,
          # u (result.y) trained on the weighted training loss alone; w
          # (result.y_penalized) on L1 + alpha L2, the validation set too.
          "model": {k: float(v) for k, v in task.evaluate(result.y).items()},
          "model_penalized": {k: float(v) for k, v in task.evaluate(
              result.y_penalized).items()}}


def fresh_trainer(task, *, learning_rate=3e-3):
  """``(indices, key) -> parameters``: a fresh model trained by AdamW on the
  batches ``indices`` (steps, b) of the training set; compiled once."""
  optimizer = optax.adamw(learning_rate, weight_decay=1e-4)

  @jax.jit
  def train(params, indices):
    def body(carry, rows):
      params_, state = carry
      batch = jax.tree.map(lambda a: a[rows], task.train)
      grads = jax.grad(lambda p: jnp.mean(task.per_example_loss(p, batch)))(
          params_)
      updates, state = optimizer.update(grads, state, params_)
      return (optax.apply_updates(params_, updates), state), None
    (params, _), _ = jax.lax.scan(body, (params, optimizer.init(params)),
                                  indices)
    return params

  return lambda indices, key: train(task.init_params(key), indices)


def _sampled(task, probabilities, key, num_steps, batch_size):
  return reweighting.resample(key, jnp.asarray(probabilities),
                              task.train["source"],
                              num_steps * batch_size).reshape(num_steps,
                                                              batch_size)


def _uniform_rows(rows, key, num_steps, batch_size):
  picks = jax.random.randint(key, (num_steps, batch_size), 0, len(rows))
  return jnp.asarray(rows)[picks]


def retrain_all(task, learned: dict, *, num_steps, key) -> dict:
  """Test metrics of fresh models: each weighting, uniform, filter, clean."""
  batch_size = 64
  num_sources = len(task.source_names)
  sampling_key, model_key = jax.random.split(key)
  train_fresh = fresh_trainer(task)
  results = {}

  def metrics(params):
    return {k: float(v) for k, v in task.evaluate(params).items()}

  uniform_probabilities = np.bincount(
      np.asarray(task.train["source"]), minlength=num_sources)
  uniform_probabilities = uniform_probabilities / uniform_probabilities.sum()
  plans = {"uniform": uniform_probabilities,
           "clean sources only (oracle)": task.clean / task.clean.sum()}
  for name, run in learned.items():
    plans[name] = np.asarray(run["weights"])
  for name, probabilities in plans.items():
    params = train_fresh(_sampled(task, probabilities, sampling_key,
                                  num_steps, batch_size), model_key)
    results[name] = metrics(params)
  # The loss filter: rank the training samples by their loss under the
  # uniformly trained model, keep the lowest, choose q on validation.
  reference = train_fresh(_sampled(task, uniform_probabilities,
                                   sampling_key, num_steps, batch_size),
                          model_key)
  losses = np.asarray(jax.jit(task.per_example_loss)(reference, task.train))
  best = None
  for fraction in FILTER_FRACTIONS:
    keep = np.argsort(losses)[:int(round((1 - fraction) * len(losses)))]
    params = train_fresh(_uniform_rows(keep, sampling_key, num_steps,
                                       batch_size), model_key)
    scores = metrics(params)
    if best is None or scores["val_loss"] < best[1]["val_loss"]:
      best = (fraction, scores)
  results["loss filter"] = dict(best[1], fraction=best[0])
  return results


def reweighting_setting(setting, opts, budget) -> dict:
  runs = []
  for seed in range(opts.seeds):
    key = jax.random.key(seed)
    task, blocks = _make_task(setting, key, **budget["task"])
    learned = {}
    for name, use_lisa in (("ScaleBiO", False), ("ScaleBiO + LISA", True)):
      learned[name] = learn_weights(task, blocks, num_steps=budget["steps"],
                                    use_lisa=use_lisa,
                                    key=jax.random.fold_in(key, 1))
      opts.log(f"{setting} seed {seed} {name}: p = "
               f"{np.round(learned[name]['weights'], 3).tolist()} in "
               f"{learned[name]['seconds']:.1f} s")
    retrained = retrain_all(task, learned, num_steps=budget["retrain"],
                            key=jax.random.fold_in(key, 2))
    opts.log(f"{setting} seed {seed} retrained: " + ", ".join(
        f"{name} {scores.get('test_accuracy', scores['test_loss']):.4f}"
        for name, scores in retrained.items()))
    runs.append({"learned": learned, "retrained": retrained,
                 "source_names": list(task.source_names),
                 "clean": task.clean.tolist()})
  return {"runs": runs, "budget": budget}


# ---------------------------------------------------------------------------
# Memory, sharding, overhead.


def _nbytes(tree) -> int:
  return int(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree)))


MEMORY_MODEL = dict(num_per_source=16, num_val=16, num_test=16, seq_len=64,
                    dim=256, num_layers=8, num_heads=8, mlp_dim=1024,
                    upper_batch_size=8, lower_batch_size=8)


def memory_setting(opts, quick: bool) -> dict:
  """State bytes and XLA's buffer plan of one compiled step."""
  model = dict(MEMORY_MODEL, **(dict(dim=32, mlp_dim=64, num_heads=4)
                                if quick else {}))
  task, _ = _make_task("text", jax.random.key(0), **model)
  rows = {}
  variants = {"AdamW": optax.adamw(1e-3, weight_decay=5e-4)}
  for active in (2,) if quick else (4, 2, 1):
    variants[f"LISA {active} of 8"] = lisa.lisa_adamw(
        1e-3, weight_decay=5e-4, blocks="layers", num_active=active,
        period=20)
  for name, optimizer in variants.items():
    solver = bilevel.solvers.scalebio(task.problem, lower_optimizer=optimizer)
    state = solver.init(task.x0, task.y0, key=jax.random.key(0),
                        data=task.data)
    plan = jax.jit(solver.step).lower(state, task.data).compile(
    ).memory_analysis()
    rows[name] = {
        "models": _nbytes((state.y, state.y_penalized)),
        "optimizer": _nbytes((state.y_opt_state,
                              state.y_penalized_opt_state)),
        "state": _nbytes(state),
        "temporaries": int(plan.temp_size_in_bytes),
        "peak": int(plan.argument_size_in_bytes + plan.output_size_in_bytes
                    + plan.temp_size_in_bytes - plan.alias_size_in_bytes)}
    opts.log(f"memory {name}: " + ", ".join(
        f"{k} {v / 2 ** 20:.1f} MiB" for k, v in rows[name].items()))
  return {"model": {k: v for k, v in model.items()
                    if k in ("seq_len", "dim", "num_layers", "mlp_dim")},
          "parameters": _nbytes(task.y0) // 4, "rows": rows}


def sharding_child() -> dict:
  """Run with 8 host devices: one device against data parallel + FSDP."""
  task, _ = _make_task("text", jax.random.key(0), num_per_source=256,
                       num_val=64, num_test=64, dim=64, mlp_dim=128,
                       upper_batch_size=32, lower_batch_size=40)
  solver = bilevel.solvers.scalebio(
      task.problem, penalty=ALPHA, lower_optimizer=lisa.lisa_adamw(
          1e-3, weight_decay=5e-4, blocks="layers", num_active=2, period=5))
  kwargs = dict(num_steps=20, key=jax.random.key(1), steps_per_chunk=10)
  one = bilevel.run(solver, task.x0, task.y0, task.data, **kwargs)
  mesh = bilevel.sharding.make_mesh()
  many = bilevel.run(solver, task.x0, task.y0,
                     bilevel.sharding.shard_data(task.data, mesh),
                     state_sharding=bilevel.sharding.fsdp(mesh), **kwargs)

  def relative(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return max(float(jnp.linalg.norm(u - v) / jnp.linalg.norm(u))
               for u, v in zip(a, b))

  def per_device(tree):
    return max(bilevel.sharding.bytes_per_device(tree).values())

  return {
      "devices": jax.device_count(),
      "relative_difference": {
          "x": relative(one.state.x, many.state.x),
          "y_penalized": relative(one.state.y_penalized,
                                  many.state.y_penalized),
          "y": relative(one.state.y, many.state.y)},
      "weights_one": np.asarray(one.history.weights[-1]).tolist(),
      "weights_many": np.asarray(many.history.weights[-1]).tolist(),
      "models_bytes": {"one": per_device((one.state.y,
                                          one.state.y_penalized)),
                       "per_device": per_device((many.state.y,
                                                 many.state.y_penalized))},
      "optimizer_bytes": {
          "one": per_device((one.state.y_opt_state,
                             one.state.y_penalized_opt_state)),
          "per_device": per_device((many.state.y_opt_state,
                                    many.state.y_penalized_opt_state))}}


def sharding_setting(opts) -> dict:
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                    " --xla_force_host_platform_device_count=8"))
  completed = subprocess.run(
      [sys.executable, "-m", "paper_repro.scalebio.run", "--sharding-child"],
      capture_output=True, text=True, env=env, timeout=1200, check=False)
  if completed.returncode != 0:
    raise RuntimeError(completed.stderr[-3000:])
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  opts.log(f"sharding: {report}")
  return report


def overhead_setting(opts, quick: bool) -> dict:
  """Per step: the ScaleBiO step against its 2 Gg + 1 Gf alone."""
  task, _ = _make_task("text", jax.random.key(0), **(
      QUICK_TEXT if quick else dict(num_per_source=256, num_val=64,
                                    num_test=64)))
  solver = bilevel.solvers.scalebio(task.problem)
  state = solver.init(task.x0, task.y0, key=jax.random.key(0),
                      data=task.data)
  num_steps = 20 if quick else 100
  data = task.data

  @jax.jit
  def steps(state):
    return jax.lax.scan(lambda s, _: (solver.step(s, data)[0], None), state,
                        None, length=num_steps)[0]

  problem = task.problem
  lower_grads = jax.value_and_grad(problem.lower, (0, 1))
  upper_grads = jax.value_and_grad(problem.upper, (0, 1))

  @jax.jit
  def oracles(state):
    def body(carry, _):
      # u is y, w is y_penalized.
      x, w, u, sampler = carry
      lower_batch, sampler = bilevel._data.sample(sampler, data, "lower")  # pylint: disable=protected-access
      upper_batch, sampler = bilevel._data.sample(sampler, data, "upper")  # pylint: disable=protected-access
      _, (_, gu) = lower_grads(x, u, lower_batch)
      _, (gx, gw) = lower_grads(x, w, lower_batch)
      _, (fx, fw) = upper_grads(x, w, upper_batch)
      # Use every output, 1e-6 of it, so that XLA keeps every call.
      nudge = lambda a, b: jax.tree.map(lambda p, q: p - 1e-6 * q, a, b)
      return (nudge(x, jax.tree.map(jnp.add, gx, fx)), nudge(w, fw),
              nudge(u, jax.tree.map(jnp.add, gu, gw)), sampler), None
    carry = (state.x, state.y_penalized, state.y, state.sampler)
    return jax.lax.scan(body, carry, None, length=num_steps)[0]

  step_ms, oracle_ms = step_and_oracle_ms(steps, oracles, state, num_steps,
                                          quick)
  report = {"step_ms": step_ms, "oracles_ms": oracle_ms}
  report["ratio"] = report["step_ms"] / report["oracles_ms"]
  opts.log(f"overhead: {report}")
  return report


# ---------------------------------------------------------------------------
# Report.


def _mean_std(values):
  values = np.asarray(values, float)
  return f"{values.mean():.4f} ± {values.std():.4f}"


def _table(setting, result) -> list[str]:
  runs = result["runs"]
  metric = "test_accuracy" if setting == "digits" else "test_loss"
  names = list(runs[0]["retrained"])
  text = setting == "text"
  lines = [f"### {setting}: fresh models retrained ({metric}, "
           f"{len(runs)} seeds)", "",
           f"| sampling | {metric} | "
           + ("test_loss − entropy rate | " if text else "") + "val_loss |",
           "| --- | --- | " + ("--- | " if text else "") + "--- |"]
  for name in names:
    values = [run["retrained"][name][metric] for run in runs]
    val = [run["retrained"][name]["val_loss"] for run in runs]
    excess = ""
    if text:
      excess = _mean_std([run["retrained"][name]["test_loss"]
                          - run["retrained"][name]["entropy_rate"]
                          for run in runs]) + " | "
    lines.append(f"| {name} | {_mean_std(values)} | {excess}"
                 f"{_mean_std(val)} |")
  if text:
    rates = [run["retrained"]["uniform"]["entropy_rate"] for run in runs]
    lines += ["", "Entropy rates of the clean chains (the floor), per seed: "
              + ", ".join(f"{rate:.4f}" for rate in rates) + "."]
  fractions = [run["retrained"]["loss filter"]["fraction"] for run in runs]
  lines += ["", f"Loss filter: fraction dropped per seed {fractions}.", ""]
  sources = runs[0]["source_names"]
  lines += ["Learned weights p (mean over seeds) and ScaleBiO's own models: "
            "u (`result.y`, trained on the weighted training loss only) and "
            "w (`result.y_penalized`, trained on L1 + alpha L2, so on the "
            "validation set too):", "", "| method | " + " | ".join(sources)
            + f" | seconds | u {metric} | w {metric} |",
            "| --- " * (len(sources) + 4) + "|"]
  for name in runs[0]["learned"]:
    weights = np.mean([run["learned"][name]["weights"] for run in runs], 0)
    seconds = np.mean([run["learned"][name]["seconds"] for run in runs])
    model, penalized = (np.mean([run["learned"][name][key][metric]
                                 for run in runs])
                        for key in ("model", "model_penalized"))
    lines.append(f"| {name} | " + " | ".join(f"{w:.3f}" for w in weights)
                 + f" | {seconds:.1f} | {model:.4f} | {penalized:.4f} |")
  return lines + [""]


def write_report(out, results, seconds):
  lines = ["# ScaleBiO reproduction", "",
           f"Total {seconds:.0f} s.", ""]
  for setting in ("digits", "text"):
    if setting in results:
      lines += _table(setting, results[setting])
  if "memory" in results:
    memory = results["memory"]
    lines += [f"### memory: one compiled ScaleBiO step, transformer "
              f"{memory['model']} ({memory['parameters']:,} parameters), "
              "float32, MiB", "",
              "| optimizer of u and w | models | optimizer states | state | "
              "XLA temporaries | XLA peak |", "| --- " * 6 + "|"]
    for name, row in memory["rows"].items():
      lines.append(f"| {name} | " + " | ".join(
          f"{row[k] / 2 ** 20:.1f}" for k in ("models", "optimizer", "state",
                                             "temporaries", "peak")) + " |")
    lines.append("")
  if "sharding" in results:
    report = results["sharding"]
    lines += ["### sharding: 1 against 8 host devices (data parallel + "
              "FSDP), 20 steps, float32", "",
              f"Largest relative difference of the final x, w "
              f"(y_penalized) and u (y): "
              f"{report['relative_difference']}. Bytes per device: models "
              f"{report['models_bytes']}, optimizer states "
              f"{report['optimizer_bytes']}.", ""]
  if "overhead" in results:
    report = results["overhead"]
    lines += ["### overhead: the step against its oracle calls (2 Gg + 1 Gf)",
              "", f"step {report['step_ms']:.2f} ms, oracles alone "
              f"{report['oracles_ms']:.2f} ms, ratio {report['ratio']:.2f}.",
              ""]
  (out / "results.md").write_text("\n".join(lines))


def plot(out, results):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  settings = [s for s in ("digits", "text") if s in results]
  if not settings:
    return
  fig, axes = plt.subplots(1, 2 * len(settings),
                           figsize=(5.5 * len(settings) * 2, 3.6))
  axes = np.atleast_1d(axes)
  for index, setting in enumerate(settings):
    runs = results[setting]["runs"]
    ax = axes[2 * index]
    path = np.mean([run["learned"]["ScaleBiO"]["path"] for run in runs], 0)
    steps = np.linspace(0, results[setting]["budget"]["steps"], len(path))
    for s, name in enumerate(runs[0]["source_names"]):
      ax.plot(steps, path[:, s], label=name,
              ls="-" if runs[0]["clean"][s] else "--")
    ax.set(title=f"{setting}: p = softmax(λ) (ScaleBiO)", xlabel="step",
           ylabel="source weight")
    ax.legend(fontsize=7)
    ax = axes[2 * index + 1]
    metric = "test_accuracy" if setting == "digits" else "test_loss"
    names = list(runs[0]["retrained"])
    values = np.array([[run["retrained"][n][metric] for run in runs]
                       for n in names])
    ax.bar(range(len(names)), values.mean(1), yerr=values.std(1))
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
    low = values.min() * (0.9 if setting == "digits" else 0.95)
    ax.set(title=f"{setting}: retrained on resampled data", ylabel=metric,
           ylim=(low, values.max() * 1.02))
  fig.tight_layout()
  fig.savefig(out / "summary.png", dpi=80)


def main(argv=None):
  if argv is None and "--sharding-child" in sys.argv:
    print(json.dumps(sharding_child()))
    return
  opts = options(__doc__.split("\n")[0], "results/paper_repro_scalebio",
                 SETTINGS, argv)
  quick = opts.args.quick
  budgets = _budgets(quick)
  results = {}
  for setting in opts.settings:
    if setting in ("digits", "text"):
      results[setting] = reweighting_setting(setting, opts, budgets[setting])
    elif setting == "memory":
      results[setting] = memory_setting(opts, quick)
    elif setting == "sharding":
      results[setting] = sharding_setting(opts)
    elif setting == "overhead":
      results[setting] = overhead_setting(opts, quick)
    else:
      raise ValueError(f"unknown setting {setting!r}; choose from "
                       f"{SETTINGS}")
    jax.clear_caches()
  save(opts, results, write_report, plot)


if __name__ == "__main__":
  main()
