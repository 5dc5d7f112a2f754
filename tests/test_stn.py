"""bilevel.solvers.stn: ridge regression against closed forms, cycles,
warm-up, the gradient path, validation and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
from bilevel import best_response as br
from problems.self_tuning import stn_ridge

KEY = jax.random.key(0)


def _ridge_solver(task, num_cycles, *, tune_scales=False, **kwargs):
  """SGD with decaying steps on both levels (constant steps only hover)."""
  num_train_steps = kwargs.pop("num_train_steps", 10)
  return bilevel.solvers.stn(
      task.problem, task.space,
      lower_optimizer=optax.sgd(optax.cosine_decay_schedule(
          0.1, num_cycles * num_train_steps, alpha=0.05), momentum=0.9),
      upper_optimizer=optax.sgd(optax.cosine_decay_schedule(0.3, num_cycles)),
      num_train_steps=num_train_steps, num_warmup_steps=500,
      tune_scales=tune_scales, **kwargs)


@pytest.mark.parametrize("seed", [0, 1])
def test_ridge_converges_to_the_grid_optimum(seed):
  """STN finds the L2 coefficient a fine grid of exact solves finds best.

  With a fixed sigma it stops where the validation gradient through the
  exactly fitted linear response vanishes (``stn_fixed_point``), which is
  O(sigma^2) from the optimum; each training row is drawn 20 times a step
  (``draws_per_row``) to keep the test short.
  """
  task = stn_ridge(draws_per_row=20)
  lam_grid, val_grid = task.grid_optimum()  # 20001 NumPy solves
  assert 0.2 < lam_grid < 0.3  # interior, and curved (see stn_ridge)
  lam_fixed = task.stn_fixed_point(0.5)
  assert abs(np.log(lam_fixed / lam_grid)) < 0.05
  assert abs(np.log(task.stn_fixed_point(0.1) / lam_grid)) < 0.005
  num_cycles = 3000
  result = bilevel.run(_ridge_solver(task, num_cycles), task.x0, task.y0,
                       task.data, num_steps=num_cycles,
                       key=jax.random.key(seed))
  lam = float(task.space.constrain(result.x.unconstrained)["l2"])
  # From 1.0 to within 3% of the fixed point and 6% of the grid optimum
  # (measured: 0.244-0.249 over three seeds; fixed point 0.2478, grid
  # 0.2560), the validation loss within 3e-4 of the best (halving or
  # doubling lambda costs 0.02 and 0.04).
  assert abs(np.log(lam / lam_fixed)) < 0.03, (lam, lam_fixed)
  assert abs(np.log(lam / lam_grid)) < 0.06, (lam, lam_grid)
  assert task.validation_loss(lam) - val_grid < 3e-4
  assert int(result.history.warmup.sum()) == 50  # 500 steps / 10 per cycle


def test_ridge_with_tuned_scales_and_entropy():
  task = stn_ridge(draws_per_row=20)
  lam_grid, val_grid = task.grid_optimum()
  num_cycles = 3000
  result = bilevel.run(
      _ridge_solver(task, num_cycles, tune_scales=True, entropy_weight=1e-3,
                    scale_optimizer=optax.adam(1e-2)),
      task.x0, task.y0, task.data, num_steps=num_cycles, key=KEY)
  lam = float(task.space.constrain(result.x.unconstrained)["l2"])
  # Measured 0.239-0.257 over three seeds.
  assert abs(np.log(lam / lam_grid)) < 0.1, (lam, lam_grid)
  assert task.validation_loss(lam) - val_grid < 1e-3
  scale = np.asarray(result.history.scale[:, 0])
  # sigma shrank from 0.5 (a narrower neighbourhood fits the validation
  # loss better) and the entropy bonus held it away from 0 (about 0.1).
  assert 0.05 < scale[-1] < 0.3 and scale.min() > 0.05


def test_response_matches_the_exact_best_response_near_lambda():
  """The trained linear response is the exact minimiser of STN's
  perturbed training objective, and that is w* to first order."""
  task = stn_ridge(init=0.3, draws_per_row=20)
  num_cycles = 3000  # hyperparameters frozen: warm-up only
  solver = bilevel.solvers.stn(
      task.problem, task.space, lower_optimizer=optax.sgd(
          optax.cosine_decay_schedule(0.1, num_cycles * 10, alpha=0.01),
          momentum=0.9),
      num_train_steps=10, num_warmup_steps=10**9, tune_scales=False)
  result = bilevel.run(solver, task.x0, task.y0, task.data,
                       num_steps=num_cycles, key=KEY)
  np.testing.assert_array_equal(result.x.unconstrained, task.x0.unconstrained)
  assert bool(result.history.warmup.all())
  centre = float(task.x0.unconstrained[0])
  base, slope = task.linear_fit(centre, 0.5)
  trained_base = np.asarray(result.y["base"])
  trained_slope = np.asarray(result.y["slope"][0])
  # Measured errors 0.003-0.008 over three seeds.
  np.testing.assert_allclose(trained_base, base, atol=0.015)
  np.testing.assert_allclose(trained_slope, slope, atol=0.015)
  # Against the exact best response: the slope at the centre, and the
  # response across the neighbourhood centre +- sigma.
  exact_slope = task.best_response_slope(centre)
  np.testing.assert_allclose(trained_slope, exact_slope,
                             atol=0.1 * np.abs(exact_slope).max())
  for offset in (-0.5, 0.0, 0.5):
    ell = centre + offset
    exact = task.best_response(float(np.logaddexp(0, ell)))
    response = trained_base + trained_slope * ell
    assert np.abs(response - exact).max() < 0.03 * np.abs(exact).max()
  # A response that ignored lambda (slope 0) would miss by far more.
  assert np.abs(exact_slope).max() * 0.5 > 0.1


def test_exact_fit_tends_to_the_tangent_as_sigma_shrinks():
  task = stn_ridge()
  centre = -1.0
  exact = task.best_response(float(np.logaddexp(0, centre)))
  errors = []
  for sigma in (0.4, 0.2, 0.1):
    base, slope = task.linear_fit(centre, sigma)
    errors.append(np.abs(base + slope * centre - exact).max())
  # O(sigma^2): halving sigma quarters the gap.
  assert 3.5 < errors[0] / errors[1] < 4.5 and 3.5 < errors[1] / errors[2] < 4.5


def _tiny_problem(upper=None):
  space = br.HyperparameterSpace({"a": br.positive(1.0),
                                  "b": br.interval(0.5, 0.0, 1.0)})
  response = br.linear(2)

  def lower(hp, phi, batch):
    w = jax.vmap(response.apply, (None, 0))(phi, hp.unconstrained)
    return jnp.mean(jnp.sum((w - batch[:, None]) ** 2, 1) *
                    (1 + hp.values["a"]))

  def default_upper(hp, phi, batch):
    w = jax.vmap(response.apply, (None, 0))(phi, hp.unconstrained)
    return jnp.mean(jnp.sum((w - 2.0) ** 2, 1))

  problem = bilevel.Problem(upper or default_upper, lower)
  data = bilevel.Data(upper=jnp.arange(6.0), lower=jnp.arange(10.0),
                      upper_batch_size=3, lower_batch_size=4)
  return problem, space, response.init(jnp.zeros(3)), data


def test_cycle_phases_warmup_and_oracle_calls():
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, num_train_steps=3,
                               num_val_steps=2, num_warmup_steps=7)
  assert solver.oracle_calls == bilevel.OracleCalls(2, 3, 0, 0)
  x0 = br.init_variables(space)
  result = bilevel.run(solver, x0, phi0, data, num_steps=6, key=KEY)
  # Warm-up: cycles 1-2 (3, 6 <= 7 training steps), then validation.
  np.testing.assert_array_equal(result.history.warmup,
                                [True, True, False, False, False, False])
  hyper = np.asarray(result.history.hyperparameters["a"])
  assert np.all(hyper[:2] == 1.0) and np.all(hyper[2:] != 1.0)
  assert np.all(np.asarray(result.history.hypergradient_norm)[:2] == 0)
  assert int(result.state.num_train_steps) == 18
  # Sampling: 18 training batches of 4 and 2 + 4 * 2 validation batches.
  for level, size, drawn in (("lower", 10, 72), ("upper", 6, 30)):
    stream = getattr(result.state.sampler, level)
    assert int(stream.epoch) * size + int(stream.position) == drawn


def test_default_warmup_is_five_epochs_of_the_training_data():
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space)  # 5 * 10 / 4 -> 13 steps
  result = bilevel.run(solver, br.init_variables(space), phi0, data,
                       num_steps=9, key=KEY)
  assert int(np.sum(result.history.warmup)) == 6  # 2 * 6 = 12 <= 13 < 14


def test_gradient_reaches_lambda_only_through_the_response():
  """f reading the constrained values directly gives no gradient."""
  def upper(hp, phi, batch):
    w = phi["base"]
    return jnp.sum((w - 2.0) ** 2) + jnp.sum(hp.values["a"])

  problem, space, phi0, data = _tiny_problem(upper)
  solver = bilevel.solvers.stn(problem, space, num_warmup_steps=0,
                               tune_scales=False,
                               upper_optimizer=optax.sgd(1.0))
  result = bilevel.run(solver, br.init_variables(space), phi0, data,
                       num_steps=3, key=KEY)
  np.testing.assert_array_equal(result.x.unconstrained,
                                br.init_variables(space).unconstrained)
  assert np.all(np.asarray(result.history.hypergradient_norm) == 0)


def test_phases_move_only_their_variables():
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, num_warmup_steps=0)
  x0 = br.init_variables(space)
  state = solver.init(x0, phi0, key=KEY, data=data)
  # A training phase alone (warm-up) leaves x; the validation phase phi.
  warm = bilevel.solvers.stn(problem, space, num_warmup_steps=100)
  warm_state, _ = warm.step(warm.init(x0, phi0, key=KEY, data=data), data)
  jax.tree.map(np.testing.assert_array_equal, warm_state.x, x0)
  new_state, info = solver.step(state, data)
  assert not np.allclose(new_state.x.unconstrained, x0.unconstrained)
  assert not np.allclose(new_state.x.raw_scale, x0.raw_scale)
  # Same key: the same training phase, so the same phi after it.
  jax.tree.map(np.testing.assert_array_equal, new_state.y, warm_state.y)
  assert float(info.val_loss) > 0


def test_same_key_same_bits_other_key_other_draws():
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, num_warmup_steps=0)
  x0 = br.init_variables(space)
  runs = [bilevel.run(solver, x0, phi0, data, num_steps=5, key=k)
          for k in (KEY, KEY, jax.random.key(1))]
  states = [state._replace(key=jax.random.key_data(state.key))
            for state in (runs[0].state, runs[1].state)]
  jax.tree.map(np.testing.assert_array_equal, *states)
  assert not np.array_equal(runs[0].x.unconstrained, runs[2].x.unconstrained)


@pytest.mark.parametrize("make,error,match", [
    (lambda p, s, y, d: bilevel.solvers.stn(p, {"a": 1}), TypeError,
     "HyperparameterSpace"),
    (lambda p, s, y, d: bilevel.solvers.stn(p, s, entropy_weight=0.0),
     ValueError, "needs entropy_weight > 0"),
    (lambda p, s, y, d: bilevel.solvers.stn(p, s, num_train_steps=0),
     ValueError, "num_train_steps"),
    (lambda p, s, y, d: bilevel.solvers.stn(p, s).init(
        jnp.zeros(2), y, key=KEY, data=d), TypeError,
     "must be a bilevel.best_response.HyperVariables"),
    (lambda p, s, y, d: bilevel.solvers.stn(p, s).init(
        br.HyperVariables(jnp.zeros(3), jnp.zeros(3)), y, key=KEY, data=d),
     ValueError, r"x.unconstrained must have shape \(2,\)"),
    (lambda p, s, y, d: bilevel.solvers.stn(
        bilevel.Problem(lambda hp, phi, b: hp.unconstrained, p.lower),
        s).init(br.init_variables(s), y, key=KEY, data=d), ValueError,
     "upper objective f .* must return a scalar"),
])
def test_bad_input(make, error, match):
  problem, space, phi0, data = _tiny_problem()
  with pytest.raises(error, match=match):
    make(problem, space, phi0, data)


def test_checkpointed_run_resumes_bit_identically(tmp_path):
  """Warm-up crossing the interruption, the key and the sampler restored."""
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, num_warmup_steps=12)
  x0 = br.init_variables(space)

  def run(num_steps, **kwargs):
    return bilevel.run(solver, x0, phi0, data, num_steps=num_steps, key=KEY,
                       steps_per_chunk=4, **kwargs)

  whole = run(12)
  run(4, checkpoint_dir=tmp_path)
  resumed = run(12, checkpoint_dir=tmp_path)
  unkey = lambda state: state._replace(key=jax.random.key_data(state.key))
  jax.tree.map(np.testing.assert_array_equal, unkey(resumed.state),
               unkey(whole.state))
  jax.tree.map(np.testing.assert_array_equal, resumed.history,
               whole.history)
  assert int(np.sum(whole.history.warmup)) == 6  # cycles 1-6 of 2 steps


def test_vmap_over_seeds_matches_separate_runs():
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, num_warmup_steps=2)
  x0 = br.init_variables(space)
  keys = jax.random.split(KEY, 3)
  batched = jax.vmap(lambda k: bilevel.run(solver, x0, phi0, data,
                                           num_steps=4, key=k).x)(keys)
  for i in range(3):
    single = bilevel.run(solver, x0, phi0, data, num_steps=4, key=keys[i]).x
    np.testing.assert_allclose(batched.unconstrained[i], single.unconstrained,
                               rtol=1e-12)
  assert not np.allclose(batched.unconstrained[0], batched.unconstrained[1])


def test_divergence_report_names_the_hyperparameters():
  """A blow-up is reported with the last finite diagnostics, the nested
  hyperparameter values included."""
  problem, space, phi0, data = _tiny_problem()
  solver = bilevel.solvers.stn(problem, space, lower_optimizer=optax.sgd(10.0),
                               num_warmup_steps=0)
  with pytest.raises(bilevel.DivergenceError,
                     match=r"hyperparameters\['a'\]=") as info:
    bilevel.run(solver, br.init_variables(space), phi0, data, num_steps=200,
                key=KEY)
  assert "train_loss" in info.value.last_finite_info
