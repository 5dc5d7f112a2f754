"""ScaleBiO, the source-weighted loss, resampling and LISA."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel
import problems
from bilevel import lisa, reweighting

# ---------------------------------------------------------------------------
# A reweighting problem with closed forms: k sources of points in R^2, source
# s centred at m_s. L2(w, lam) = sum_j p_{s_j} / n(s_j) |w - a_j|^2 / 2 is
# minimised at w*(lam) = sum_s p_s mean_s, L1(w) = mean_v |w - v|^2 / 2 on a
# clean validation set centred at m_0 = m_1.

NUM_SOURCES = 4
CENTRES = np.array([[1.0, -1.0], [1.0, -1.0], [-2.0, 0.5], [3.0, 2.0]])


def _mean_sources(num_per_source=50, seed=0):
  rng = np.random.default_rng(seed)
  points = np.concatenate([c + 0.3 * rng.standard_normal((num_per_source, 2))
                           for c in CENTRES])
  sources = np.repeat(np.arange(NUM_SOURCES), num_per_source).astype(np.int32)
  val = CENTRES[0] + 0.3 * rng.standard_normal((100, 2))

  def lower(x, y, batch):
    losses = 0.5 * jnp.sum((y - batch["point"]) ** 2, axis=1)
    return reweighting.source_weighted_loss(x, losses, batch["source"])

  def upper(x, y, batch):
    del x
    return 0.5 * jnp.mean(jnp.sum((y - batch["point"]) ** 2, axis=1))

  problem = bilevel.Problem(upper=upper, lower=lower)
  train = {"point": jnp.asarray(points), "source": jnp.asarray(sources)}
  means = np.stack([points[sources == s].mean(0) for s in range(NUM_SOURCES)])
  return problem, train, {"point": jnp.asarray(val)}, means, val.mean(0)


def test_source_weighted_loss_by_hand():
  logits = jnp.array([0.3, -0.2, 1.0])
  losses = jnp.array([1.0, 2.0, 4.0, 8.0, 16.0])
  sources = jnp.array([0, 2, 0, 2, 2])  # source 1 is absent
  p = jax.nn.softmax(logits)
  expected = p[0] * (1.0 + 4.0) / 2 + p[2] * (2.0 + 8.0 + 16.0) / 3
  np.testing.assert_allclose(
      reweighting.source_weighted_loss(logits, losses, sources), expected,
      rtol=1e-14)
  with pytest.raises(ValueError, match="shape"):
    reweighting.source_weighted_loss(logits, losses, sources[:3])
  with pytest.raises(TypeError, match="integers"):
    reweighting.source_weighted_loss(logits, losses, losses)


def test_resample_follows_source_probabilities():
  sources = jnp.array([0] * 10 + [1] * 30 + [2] * 60, jnp.int32)
  p = jnp.array([0.5, 0.5, 0.0])
  indices = reweighting.resample(jax.random.key(0), p, sources, 20_000)
  drawn = np.bincount(np.asarray(sources[indices]), minlength=3) / 20_000
  np.testing.assert_allclose(drawn, [0.5, 0.5, 0.0], atol=0.02)
  # Uniform within a source: each of source 0's ten samples about 1/20.
  within = np.bincount(np.asarray(indices[sources[indices] == 0]),
                       minlength=10)[:10] / 20_000
  np.testing.assert_allclose(within, 0.05, atol=0.01)


def test_one_step_by_hand():
  problem, train, val, _, _ = _mean_sources()
  data = bilevel.Data(upper=val, lower=train, upper_batch_size=10,
                      lower_batch_size=16)
  alpha, eta_x, eta_w, eta_u = 7.0, 0.3, 0.05, 0.02
  solver = bilevel.solvers.scalebio(problem, upper_optimizer=eta_x,
                                    lower_optimizer=eta_w,
                                    z_optimizer=eta_u, penalty=alpha)
  x0 = jnp.array([0.1, -0.3, 0.2, 0.0])
  y0 = jnp.array([0.5, 0.2])
  state = solver.init(x0, y0, key=jax.random.key(3), data=data)
  step = jax.jit(solver.step)
  # Take a first step so that u != w, then check the second by hand.
  state, _ = step(state, data)
  x, u, w = state.x, state.y, state.y_penalized
  lower_batch, sampler = bilevel._data.sample(state.sampler, data, "lower")
  upper_batch, _ = bilevel._data.sample(sampler, data, "upper")
  gx_u, gu = jax.grad(problem.lower, (0, 1))(x, u, lower_batch)
  gx_w, gw = jax.grad(problem.lower, (0, 1))(x, w, lower_batch)
  fx, fw = jax.grad(problem.upper, (0, 1))(x, w, upper_batch)
  new, info = step(state, data)
  np.testing.assert_allclose(new.y, u - eta_u * alpha * gu, rtol=1e-12)
  np.testing.assert_allclose(new.y_penalized, w - eta_w * (fw + alpha * gw),
                             rtol=1e-12)
  np.testing.assert_allclose(new.x, x - eta_x * (fx + alpha * (gx_w - gx_u)),
                             rtol=1e-12)
  np.testing.assert_allclose(info.lower_gap,
                             problem.lower(x, w, lower_batch)
                             - problem.lower(x, u, lower_batch), rtol=1e-12)
  np.testing.assert_allclose(info.weights, jax.nn.softmax(new.x), rtol=1e-12)
  assert float(info.penalty) == alpha


def test_direction_tends_to_the_hypergradient_like_one_over_alpha():
  problem, train, val, means, val_mean = _mean_sources()
  x = jnp.array([0.4, -0.1, 0.3, -0.5])
  p = jax.nn.softmax(x)
  # Closed forms on the full data: w*(lam) = sum_s p_s mean_s, and
  # dPhi/dlam_s = p_s (mean_s - w*) . (w* - val_mean).
  w_star = p @ means
  exact = p * ((means - w_star) @ (w_star - val_mean))
  errors = []
  for alpha in (10.0, 100.0):
    # The exact minimiser of L1 + alpha L2 and of L2.
    w_alpha = (val_mean + alpha * w_star) / (1.0 + alpha)
    solver = bilevel.solvers.scalebio(problem, upper_optimizer=1.0,
                                      lower_optimizer=1.0, penalty=alpha)
    state = solver.init(x, jnp.asarray(w_alpha), data=bilevel.Data(
        upper=val, lower=train))._replace(y=jnp.asarray(w_star))
    new, _ = solver.step(state, bilevel.Data(upper=val, lower=train))
    errors.append(float(jnp.linalg.norm((x - new.x) - exact)))
  # O(1/alpha): ten times alpha, about a tenth of the error.
  assert errors[1] < 2e-3 * float(jnp.linalg.norm(exact)) * 10
  assert 8.0 < errors[0] / errors[1] < 12.0, errors


def test_gap_to_x_star_shrinks_like_one_over_alpha_on_quadratic():
  instance = problems.quadratic(jax.random.key(0), dim_x=10, dim_y=8,
                                condition_number=10.0)
  errors = {}
  for alpha in (10.0, 100.0):
    # SGD: w's direction grows with alpha, so its step shrinks with it.
    solver = bilevel.solvers.scalebio(
        instance.problem, upper_optimizer=0.5, lower_optimizer=1.0 / alpha,
        z_optimizer=1.0 / alpha, penalty=alpha)
    result = bilevel.run(solver, instance.x0, instance.y0, num_steps=3000)
    errors[alpha] = float(jnp.linalg.norm(result.x - instance.x_star)
                          / jnp.linalg.norm(instance.x_star))
  # Measured: 0.126 and 0.0143.
  assert errors[100.0] < 0.02
  assert 7.0 < errors[10.0] / errors[100.0] < 13.0, errors


def test_weights_concentrate_on_the_clean_sources():
  problem, train, val, _, _ = _mean_sources()
  data = bilevel.Data(upper=val, lower=train, upper_batch_size=20,
                      lower_batch_size=40)
  solver = bilevel.solvers.scalebio(
      problem, upper_optimizer=optax.adam(0.05),
      lower_optimizer=optax.adam(0.05), penalty=10.0)
  result = bilevel.run(solver, jnp.zeros(NUM_SOURCES), jnp.zeros(2), data,
                       num_steps=1500, key=jax.random.key(0))
  weights = result.history.weights[-1]
  assert float(weights[0] + weights[1]) > 0.95, weights
  np.testing.assert_allclose(result.y, CENTRES[0], atol=0.1)


def test_refuses_constrained_problems_and_bad_penalty():
  problem, *_ = _mean_sources()
  with pytest.raises(ValueError, match="penalty"):
    bilevel.solvers.scalebio(problem, penalty=-1.0)
  constrained = bilevel.Problem(problem.upper, problem.lower,
                                lower_constraints=lambda x, y: y - 1.0)
  with pytest.raises(ValueError, match="constraints"):
    bilevel.solvers.scalebio(constrained)


# ---------------------------------------------------------------------------
# LISA.


def _stacked_params(num_layers=6):
  keys = jax.random.split(jax.random.key(0), 3)
  return {"embed": jax.random.normal(keys[0], (5, 3)),
          "layers": {"w": jax.random.normal(keys[1], (num_layers, 3, 3)),
                     "b": jnp.zeros((num_layers, 3))},
          "head": jax.random.normal(keys[2], (3,))}


def _toy_loss(params):
  return (jnp.sum(jnp.tanh(params["layers"]["w"]) ** 2)
          + jnp.sum((params["layers"]["b"] - 1.0) ** 2)
          + jnp.sum(params["embed"] ** 2) + jnp.sum(params["head"] ** 2))


def _train(optimizer, params, num_steps):
  state = optimizer.init(params)

  def body(carry, _):
    params_, state_ = carry
    updates, state_ = optimizer.update(jax.grad(_toy_loss)(params_), state_,
                                       params_)
    changed = jnp.any(updates["layers"]["w"] != 0.0, axis=(1, 2))
    return (optax.apply_updates(params_, updates), state_), changed

  (params, state), changed = jax.lax.scan(body, (params, state), None,
                                          length=num_steps)
  return params, state, changed


def test_lisa_with_every_block_active_is_adamw():
  params = _stacked_params()
  expected, _, _ = _train(optax.adamw(0.05, weight_decay=1e-3), params, 50)
  got, _, _ = _train(lisa.lisa_adamw(0.05, weight_decay=1e-3, blocks="layers",
                                     num_active=6, period=7), params, 50)
  chex.assert_trees_all_close(got, expected, rtol=1e-13, atol=1e-13)


def test_lisa_trains_only_the_drawn_blocks():
  params = _stacked_params()
  optimizer = lisa.lisa_adamw(0.05, blocks="layers", num_active=2, period=5)
  final, state, changed = _train(optimizer, params, 40)
  changed = np.asarray(changed)
  # Two blocks updated per step, the same within each period of 5 steps.
  assert (changed.sum(axis=1) == 2).all()
  for start in range(0, 40, 5):
    assert (changed[start:start + 5] == changed[start]).all()
  # Over 8 periods the draws differ and cover most blocks.
  assert len({tuple(row) for row in changed[::5]}) > 3
  assert changed.any(axis=0).sum() >= 5
  # The rest is always trained.
  assert float(jnp.max(jnp.abs(final["head"] - params["head"]))) > 0.1
  # The blocks' optimizer state has the size of 2 blocks, not 6.
  block_state = state[0].block_state[0]
  assert block_state.mu["layers"]["w"].shape == (2, 3, 3)
  assert block_state.mu["embed"] is None


def test_lisa_reseed_changes_the_draws_and_errors():
  params = _stacked_params()
  optimizer = lisa.lisa_adamw(0.05, blocks="layers", num_active=2, period=1)
  state = optimizer.init(params)
  other = lisa.reseed(state, jax.random.key(7))
  draws = [lisa.draw_active(s[0].key, jnp.int32(e), 6, 2)
           for s in (state, other) for e in range(4)]
  assert any((np.asarray(a) != np.asarray(b)).any()
             for a, b in zip(draws[:4], draws[4:]))
  with pytest.raises(ValueError, match="selects no leaf"):
    lisa.lisa_adamw(0.1, blocks="nope", num_active=1, period=1).init(params)
  with pytest.raises(ValueError, match="exceeds"):
    lisa.lisa_adamw(0.1, blocks="layers", num_active=7, period=1).init(params)
  with pytest.raises(ValueError, match="num_active"):
    lisa.lisa_adamw(0.1, blocks="layers", num_active=0, period=1)
  bad = dict(params, layers={"w": jnp.zeros((6, 3)), "b": jnp.zeros((5,))})
  with pytest.raises(ValueError, match="leading"):
    lisa.num_blocks(bad, "layers")


def test_scalebio_draws_lisa_blocks_independently_for_u_and_w():
  params = _stacked_params()

  def lower(x, y, batch):
    del batch
    return jnp.exp(x[0]) * _toy_loss(y)

  def upper(x, y, batch):
    del x, batch
    return jnp.sum(y["head"] ** 2)

  solver = bilevel.solvers.scalebio(
      bilevel.Problem(upper, lower), lower_optimizer=lisa.lisa_adamw(
          0.01, blocks="layers", num_active=2, period=1))
  draws = {"w": [], "u": []}
  state = solver.init(jnp.zeros(1), params, key=jax.random.key(0))
  step = jax.jit(solver.step)
  for _ in range(6):
    state, _ = step(state)
    draws["w"].append(tuple(np.asarray(
        lisa.active_blocks(state.y_penalized_opt_state)[0])))
    draws["u"].append(tuple(np.asarray(
        lisa.active_blocks(state.y_opt_state)[0])))
  assert draws["w"] != draws["u"]
  # Frozen blocks of w (y_penalized) did not move at the last step.
  before = state.y_penalized
  after, _ = step(state)
  moved = np.asarray(jnp.any(
      after.y_penalized["layers"]["w"] != before["layers"]["w"], axis=(1, 2)))
  active = np.asarray(lisa.active_blocks(after.y_penalized_opt_state)[0])
  assert set(np.flatnonzero(moved)) == set(active.tolist())


def test_penalty_schedule_is_read_at_each_step():
  problem, train, val, _, _ = _mean_sources()
  data = bilevel.Data(upper=val, lower=train)
  solver = bilevel.solvers.scalebio(problem, penalty=lambda t: 2.0 + 3.0 * t)
  result = bilevel.run(solver, jnp.zeros(NUM_SOURCES), jnp.zeros(2), data,
                       num_steps=4)
  np.testing.assert_allclose(result.history.penalty, [2.0, 5.0, 8.0, 11.0])
  # With u = w the lambda direction has no penalty term: d_lambda = 0 at
  # the first step (f does not depend on lambda), so lambda stays put.
  first = bilevel.run(solver, jnp.zeros(NUM_SOURCES), jnp.zeros(2), data,
                      num_steps=1)
  assert float(first.history.hypergradient_norm[0]) == 0.0
