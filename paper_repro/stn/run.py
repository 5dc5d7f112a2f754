"""Self-Tuning Networks (MacKay et al., 2019) against grid and random search.

``python -m paper_repro.stn.run [--quick] [--out DIR] [--settings ...]``

Settings (float32, CPU): an MLP (two gated dense layers of 128 units) and
a small CNN (two gated convolutions with 16 and 32 channels, each followed
by a 2x max-pool) on scikit-learn's digits (600 training, 300 validation,
897 test images) and on MNIST-1D (1500 / 1000 / 1500 signals)
(``problems.self_tuning.stn_classifier``). Tuned: per-layer dropout
``dropout0``, ``dropout1``, input dropout, Gaussian input noise, the range
of random shifts (an integer: up to 2 pixels on digits, 8 steps on
MNIST-1D) and the L2 coefficient, all from the paper's start values (0.05;
shift 0, L2 1e-4). Every method trains with SGD 0.01 and momentum 0.9 on
batches of 128 (the paper's CNN settings) and is judged by its validation
loss; the tables report the test loss and accuracy of what each method
selects.

Per seed, with a budget of ``N`` STN cycles (``2N`` training steps and
``N`` hyperparameter steps, the paper's ``T_train = 2``, ``T_val = 1``):

* **STN**: the paper's defaults (warm-up 5 epochs, Adam 3e-3 on the
  hyperparameters and the scales, entropy weight 1e-3, sigma_0 = 0.5); the
  model at the final hyperparameters, evaluated without regularizers.
* **grid search, equal steps**: 12 plain networks (dropout of every layer
  in {0, 0.15, 0.3, 0.45, 0.6, 0.75} x shift in {0, max}), each trained
  ``3N / 12`` steps, so that all of them take as many steps as STN.
* **random search, equal steps**: 12 plain networks at hyperparameters
  drawn uniformly (dropouts in [0, 0.75], input dropout and noise in [0,
  0.5], shift in {0..max}, L2 log-uniform in [1e-6, 1e-2]), ``3N / 12``
  steps each.
* **best fixed dropout**: the dropout grid alone (shift 0), each network
  trained as long as STN trains (``2N`` steps): 6 times STN's training
  steps. Its ``p = 0`` member is the **no regularization** row.
* **plain network at STN's final values**: a plain network trained ``2N``
  steps at the hyperparameters STN ended with. It differs from STN in two
  ways at once (the architecture and the schedule), so it cannot say which
  one helps.
* **STN hypernetwork at STN's final values**: the control that separates
  the two. STN's own gated model, initial weights, optimizer, minibatch
  stream and ``2N`` training steps, with STN's final upper variable
  ``(lambda~, sigma)`` held fixed from the first step to the last: the
  training phase still perturbs each example's hyperparameters by STN's
  final ``sigma``, and no validation step runs. The same ``sigma`` keeps
  the training phase identical to STN's in every respect but the moving
  hyperparameters (the perturbation is part of what the gated model is
  trained on, and the start-values control below also perturbs); it is
  evaluated at the final ``lambda~`` without regularizers, as STN is.
  (Its perturbation draws differ from STN's after the warm-up, since no
  validation step consumes the key.) If it does as well as STN, the
  schedule adds nothing to its own end point.
* **STN hypernetwork, start values never tuned**: the same, at the start
  values and ``sigma_0`` instead (STN's model and training phase without a
  single hyperparameter step): what the architecture gives without the
  tuning.

Plain networks skip the hypernetwork's half of each layer, so a step costs
about half of an STN step; compute is counted in steps, as the issue asks.
``--controls-only`` runs STN, the plain network and the hypernetwork at
STN's final values, and skips the searches and the start-values control.

* ``overhead``: an STN cycle (2 Gg + 1 Gf) against those oracle calls
  alone, for the digits MLP and the MNIST-1D CNN (the MLP alone with
  ``--quick``).

Writes ``results.md``, ``results.json`` and ``summary.png`` to ``--out``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel
from bilevel import best_response as br
from paper_repro._common import options, save, step_and_oracle_ms
from problems import self_tuning

SETTINGS = ("digits-mlp", "digits-cnn", "mnist1d-mlp", "mnist1d-cnn",
            "overhead")
DROPOUTS = (0.0, 0.15, 0.3, 0.45, 0.6, 0.75)
NUM_RANDOM = 12
LEARNING_RATE = 0.01
BATCH_SIZE = 128
# STN cycles per setting (full run, --quick).
CYCLES = {"digits-mlp": (2000, 60), "digits-cnn": (1500, 30),
          "mnist1d-mlp": (3000, 60), "mnist1d-cnn": (1500, 30)}
QUICK_MODEL = {"mlp": dict(width=32), "cnn": dict(channels=(4, 8))}


def _split(setting):
  dataset, architecture = setting.split("-")
  return dataset, architecture


def _max_shift(dataset):
  return 2 if dataset == "digits" else 8


def _config(dataset, *, dropout=0.0, input_dropout=0.0, input_noise=0.0,
            shift=0, l2=1e-4) -> dict:
  del dataset
  return {"dropout0": dropout, "dropout1": dropout,
          "input_dropout": input_dropout, "input_noise": input_noise,
          "shift": float(shift), "l2": l2}


def _stack(configs):
  return {name: jnp.asarray([c[name] for c in configs], jnp.float32)
          for name in configs[0]}


def fixed_trainer(task):
  """``train(values, num_steps, key) -> metrics``, vmapped over configs.

  A plain network (the hypernetwork's half of each layer skipped) from the
  task's initial parameters, SGD with momentum, the regularizers at fixed
  values; metrics of the final network without regularizers.
  """
  train_x, train_y = (jnp.asarray(a) for a in task.splits["train"])
  train_x = train_x.astype(jnp.float32)
  evaluation = {name: (jnp.asarray(x, jnp.float32), jnp.asarray(y))
                for name, (x, y) in task.splits.items()
                if name in ("val", "test")}
  optimizer = optax.sgd(LEARNING_RATE, momentum=0.9)
  plain = {name: {k: v for k, v in layer.items()
                  if k not in ("hyper_kernel", "hyper_bias", "gate")}
           for name, layer in task.y0.items()}

  def one(values, num_steps, key):
    def body(carry, step_key):
      params, opt_state = carry
      rows_key, reg_key = jax.random.split(step_key)
      rows = jax.random.randint(rows_key, (BATCH_SIZE,), 0, train_y.shape[0])
      per_example = {k: jnp.broadcast_to(v, (BATCH_SIZE,))
                     for k, v in values.items()}
      grads = jax.grad(self_tuning.training_loss)(
          params, train_x[rows], train_y[rows], None, per_example, reg_key)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(
        body, (plain, optimizer.init(plain)),
        jax.random.split(key, num_steps))
    metrics = {}
    for name, (inputs, labels) in evaluation.items():
      logits = self_tuning.classifier_apply(params, inputs, None)
      metrics[f"{name}_loss"] = self_tuning.cross_entropy(logits, labels)
      metrics[f"{name}_accuracy"] = self_tuning.accuracy(logits, labels)
    return metrics

  compiled = jax.jit(jax.vmap(one, in_axes=(0, None, 0)), static_argnums=1)

  def train(configs, num_steps, key):
    keys = jax.random.split(key, len(configs))
    out = compiled(_stack(configs), num_steps, keys)
    return [{k: float(v[i]) for k, v in out.items()}
            for i in range(len(configs))]

  return train


def _best(configs, metrics):
  index = int(np.argmin([m["val_loss"] for m in metrics]))
  return {**metrics[index], "config": configs[index]}


def random_configs(dataset, rng, num):
  configs = []
  for _ in range(num):
    configs.append(_config(
        dataset, dropout=float(rng.uniform(0, 0.75)),
        input_dropout=float(rng.uniform(0, 0.5)),
        input_noise=float(rng.uniform(0, 0.5)),
        shift=int(rng.integers(0, _max_shift(dataset) + 1)),
        l2=float(np.exp(rng.uniform(np.log(1e-6), np.log(1e-2))))))
    configs[-1]["dropout1"] = float(rng.uniform(0, 0.75))
  return configs


def _frozen_solver(task):
  """STN whose warm-up never ends: its training phase alone."""
  return bilevel.solvers.stn(task.problem, task.space,
                             num_warmup_steps=10 ** 9)


def _hypernetwork_at(task, frozen, x, num_cycles, seed):
  """STN's model trained ``2 num_cycles`` steps with ``x`` held fixed.

  The training phase of ``bilevel.solvers.stn`` alone (the warm-up never
  ends, so no validation step moves ``x``): per-example hyperparameters
  drawn around ``x.unconstrained`` with scale ``x.scale``, the same
  optimizer, initial weights and key as STN's run. ``frozen`` is
  :func:`_frozen_solver` (one instance per task, so that both controls
  share one compilation). Returns the metrics of the model at
  ``x.unconstrained`` without regularizers.
  """
  result = bilevel.run(frozen, x, task.y0, task.data, num_steps=num_cycles,
                       key=jax.random.key(seed))
  return {k: float(v) for k, v in task.evaluate(result.x, result.y).items()}


def run_seed(setting, seed, num_cycles, quick, log,
             controls_only=False) -> dict:
  dataset, architecture = _split(setting)
  task = self_tuning.stn_classifier(
      dataset, architecture, seed,
      **(QUICK_MODEL[architecture] if quick else {}))
  solver = bilevel.solvers.stn(task.problem, task.space)
  began = time.perf_counter()
  result = bilevel.run(solver, task.x0, task.y0, task.data,
                       num_steps=num_cycles, key=jax.random.key(seed))
  stn_seconds = time.perf_counter() - began
  stn = {k: float(v) for k, v in task.evaluate(result.x, result.y).items()}
  final = {k: float(v) for k, v in
           task.space.constrain(result.x.unconstrained).items()}
  final_scale = np.asarray(result.x.scale, float).tolist()
  every = max(1, num_cycles // 150)
  schedule = {k: np.asarray(v[::every], float).tolist()
              for k, v in result.history.hyperparameters.items()}
  schedule["step"] = (2 * np.arange(1, num_cycles + 1)[::every]).tolist()
  schedule["scale"] = np.asarray(result.history.scale[::every]).tolist()
  log(f"{setting} seed {seed}: STN {stn_seconds:.1f} s, test loss "
      f"{stn['test_loss']:.4f}, final {final}, sigma {final_scale}")

  # Control of the schedule: the same hypernetwork and training phase with
  # STN's final (lambda~, sigma) held fixed throughout.
  frozen = _frozen_solver(task)
  began = time.perf_counter()
  at_final = _hypernetwork_at(task, frozen, result.x, num_cycles, seed)
  control_seconds = time.perf_counter() - began
  log(f"{setting} seed {seed}: hypernetwork at STN's final values "
      f"{control_seconds:.1f} s, test loss {at_final['test_loss']:.4f}")

  train = fixed_trainer(task)
  key = jax.random.key(1000 + seed)
  keys = jax.random.split(key, 4)
  began = time.perf_counter()
  final_metrics = train([final], 2 * num_cycles, keys[3])
  methods = {"STN": {**stn, "config": final}}
  if not controls_only:
    # Control of the tuning: the same hypernetwork at the start values,
    # perturbed by sigma_0, never tuned.
    control = _hypernetwork_at(task, frozen, task.x0, num_cycles, seed)
    total = 3 * num_cycles
    short = total // 12
    grid = [_config(dataset, dropout=p, shift=s) for p in DROPOUTS
            for s in (0, _max_shift(dataset))]
    randoms = random_configs(dataset, np.random.default_rng(seed),
                             NUM_RANDOM)
    fixed = [_config(dataset, dropout=p) for p in DROPOUTS]
    grid_metrics = train(grid, short, keys[0])
    random_metrics = train(randoms, short, keys[1])
    fixed_metrics = train(fixed, 2 * num_cycles, keys[2])
    methods.update({
        "grid search, equal steps": _best(grid, grid_metrics),
        "random search, equal steps": _best(randoms, random_metrics),
        "best fixed dropout (6x steps)": _best(fixed, fixed_metrics),
        "no regularization": {**fixed_metrics[0], "config": fixed[0]}})
  methods["plain network at STN's final values"] = {**final_metrics[0],
                                                    "config": final}
  methods["STN hypernetwork at STN's final values"] = {**at_final,
                                                       "config": final}
  if not controls_only:
    methods["STN hypernetwork, start values never tuned"] = {
        **control, "config": _config(dataset)}
  log(f"{setting} seed {seed}: plain networks and the start-values "
      f"control {time.perf_counter() - began:.1f} s")
  out = {"methods": methods, "schedule": schedule,
         "final_scale": final_scale, "stn_seconds": stn_seconds,
         "control_seconds": control_seconds}
  if not controls_only:
    out["fixed_dropout_curve"] = [m["val_loss"] for m in fixed_metrics]
  return out


def overhead_setting(opts, quick) -> dict:
  """An STN cycle against its 2 Gg + 1 Gf alone, per setting."""
  rows = {}
  for setting in ("digits-mlp",) if quick else ("digits-mlp", "mnist1d-cnn"):
    dataset, architecture = _split(setting)
    task = self_tuning.stn_classifier(
        dataset, architecture, **(QUICK_MODEL[architecture] if quick else {}))
    solver = bilevel.solvers.stn(task.problem, task.space,
                                 num_warmup_steps=0)
    state = solver.init(task.x0, task.y0, key=jax.random.key(0),
                        data=task.data)
    data = task.data
    num_cycles = 10 if quick else 50
    problem = task.problem
    space = task.space

    @jax.jit
    def cycles(state):
      return jax.lax.scan(lambda s, _: (solver.step(s, data)[0], None),
                          state, None, length=num_cycles)[0]

    @jax.jit
    def oracles(state):
      rows_ = br.perturb(space, state.x.unconstrained, None, None,
                         BATCH_SIZE).unconstrained
      values = space.constrain(rows_)
      gg = jax.grad(lambda phi, hp, b: problem.lower(hp, phi, b))
      gf = jax.grad(lambda r, phi, b: problem.upper(
          br.Hyperparameters(r, values, None), phi, b))

      def body(carry, key):
        phi, r, sampler = carry
        for _ in range(2):  # T_train gradients of g
          batch, sampler = bilevel._data.sample(sampler, data, "lower")  # pylint: disable=protected-access
          hp = br.Hyperparameters(r, values, key)
          phi = jax.tree.map(lambda p, g: p - 1e-6 * g, phi,
                             gg(phi, hp, batch))
        batch, sampler = bilevel._data.sample(sampler, data, "upper")  # pylint: disable=protected-access
        r = r - 1e-6 * gf(r, phi, batch)  # T_val gradient of f
        return (phi, r, sampler), None

      carry = (state.y, rows_, state.sampler)
      return jax.lax.scan(body, carry,
                          jax.random.split(state.key, num_cycles))[0]

    cycle_ms, oracle_ms = step_and_oracle_ms(cycles, oracles, state,
                                             num_cycles, quick)
    report = {"cycle_ms": cycle_ms, "oracles_ms": oracle_ms}
    report["ratio"] = report["cycle_ms"] / report["oracles_ms"]
    rows[setting] = report
    opts.log(f"overhead {setting}: {report}")
  return rows


# ---------------------------------------------------------------------------
# Report.


def _mean_std(values, digits=4):
  values = np.asarray(values, float)
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def _table(setting, result) -> list[str]:
  runs = result["runs"]
  names = list(runs[0]["methods"])
  lines = [f"### {setting}: {result['cycles']} STN cycles "
           f"({2 * result['cycles']} training steps), {len(runs)} seeds", "",
           "| method | test loss | test accuracy | val loss |",
           "| --- | --- | --- | --- |"]
  for name in names:
    cell = lambda key: _mean_std([run["methods"][name][key] for run in runs])
    lines.append(f"| {name} | {cell('test_loss')} | "
                 f"{cell('test_accuracy')} | {cell('val_loss')} |")
  finals = {k: np.mean([run["methods"]["STN"]["config"][k] for run in runs])
            for k in runs[0]["methods"]["STN"]["config"]}
  scales = np.mean([run["final_scale"] for run in runs], axis=0)
  lines += ["", "STN's final hyperparameters (mean over seeds): " + ", ".join(
      f"{k} {v:.3g}" for k, v in finals.items()) + "; final sigma "
            + ", ".join(f"{v:.3g}" for v in scales) + ".",
            "Test loss per seed: " + "; ".join(
                f"{name} " + ", ".join(f"{run['methods'][name]['test_loss']:.4f}"
                                       for run in runs)
                for name in ("STN", "STN hypernetwork at STN's final values",
                             "STN hypernetwork, start values never tuned")
                if name in names) + "."]
  if "best fixed dropout (6x steps)" in names:
    lines.append("Best fixed dropout per seed: " + ", ".join(
        f"{run['methods']['best fixed dropout (6x steps)']['config']['dropout0']:.2f}"
        for run in runs) + ".")
  lines += ["STN took " + _mean_std([run["stn_seconds"] for run in runs], 1)
            + " s, its hypernetwork at the final values "
            + _mean_std([run["control_seconds"] for run in runs], 1) + " s.",
            ""]
  return lines


def write_report(out, results, seconds):
  lines = ["# Self-Tuning Networks reproduction", "", f"Total {seconds:.0f} s.",
           ""]
  for setting in SETTINGS[:-1]:
    if setting in results:
      lines += _table(setting, results[setting])
  if "overhead" in results:
    lines += ["### overhead: an STN cycle against its oracle calls "
              "(2 Gg + 1 Gf)", "", "| model | cycle (ms) | oracles alone "
              "(ms) | ratio |", "| --- | --- | --- | --- |"]
    for setting, row in results["overhead"].items():
      lines.append(f"| {setting} | {row['cycle_ms']:.2f} | "
                   f"{row['oracles_ms']:.2f} | {row['ratio']:.2f} |")
    lines.append("")
  (out / "results.md").write_text("\n".join(lines))


def plot(out, results):
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  settings = [s for s in SETTINGS[:-1] if s in results]
  if not settings:
    return
  fig, axes = plt.subplots(len(settings), 3,
                           figsize=(15, 3.2 * len(settings)), squeeze=False)
  for row, setting in enumerate(settings):
    runs = results[setting]["runs"]
    schedule = runs[0]["schedule"]
    steps = schedule["step"]
    ax = axes[row, 0]
    for name in ("dropout0", "dropout1", "input_dropout", "input_noise"):
      ax.plot(steps, schedule[name], label=name)
    ax.set(title=f"{setting}: schedules (seed 0)", xlabel="training step",
           ylabel="value")
    ax.legend(fontsize=7)
    ax = axes[row, 1]
    ax.plot(steps, schedule["shift"], color="C4", label="shift range")
    ax.set(xlabel="training step", ylabel="shift (pixels / steps)")
    twin = ax.twinx()
    twin.semilogy(steps, schedule["l2"], color="C5", label="L2")
    twin.set_ylabel("L2")
    ax.set_title(f"{setting}: shift range and L2")
    ax.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    ax = axes[row, 2]
    names = list(runs[0]["methods"])
    values = np.array([[run["methods"][n]["test_loss"] for run in runs]
                       for n in names])
    ax.barh(range(len(names)), values.mean(1), xerr=values.std(1))
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.set(title=f"{setting}: test loss", xlim=(0.9 * values.min(),
                                                1.05 * values.max()))
  fig.tight_layout()
  fig.savefig(out / "summary.png", dpi=60)


def main(argv=None):
  opts = options(
      __doc__.split("\n")[0], "results/paper_repro_stn", SETTINGS, argv,
      extra=lambda parser: parser.add_argument(
          "--controls-only", action="store_true",
          help="STN and its controls at the final values only (no search, "
          "no start-values control)"))
  quick = opts.args.quick
  results = {}
  for setting in opts.settings:
    if setting == "overhead":
      results[setting] = overhead_setting(opts, quick)
    elif setting in CYCLES:
      cycles = CYCLES[setting][1 if quick else 0]
      results[setting] = {
          "cycles": cycles,
          "runs": [run_seed(setting, seed, cycles, quick, opts.log,
                            opts.args.controls_only)
                   for seed in range(opts.seeds)]}
    else:
      raise ValueError(f"unknown setting {setting!r}; choose from "
                       f"{SETTINGS}")
    jax.clear_caches()
  save(opts, results, write_report, plot)


if __name__ == "__main__":
  main()
