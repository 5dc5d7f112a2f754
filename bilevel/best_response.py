r"""Best-response models of the weights as functions of the hyperparameters.

Self-Tuning Networks (MacKay et al., ICLR 2019) replace the inner argmin
:math:`w^*(\lambda) = \arg\min_w L_{\text{train}}(w, \lambda)` by a
hypernetwork :math:`\hat w_\phi(\lambda)` trained on hyperparameters drawn
around the current ones, and tune :math:`\lambda` by differentiating the
validation loss through :math:`\hat w_\phi`. This module holds the pieces:

**Hyperparameters with kinds.** A :class:`HyperparameterSpace` names the
hyperparameters and how each maps an unconstrained number
:math:`\tilde\lambda \in \mathbb{R}` (what is optimised, and what the
hypernetwork reads) to its value :math:`\lambda` (what the regularizer
uses):

- :func:`interval` ``(low, high)``: :math:`\lambda = l + (h - l)\,
  \mathrm{sigmoid}(\tilde\lambda)` (a stretched sigmoid), e.g. a dropout
  rate in ``(0, 0.9)``;
- :func:`positive`: :math:`\lambda = \mathrm{softplus}(\tilde\lambda)`, e.g.
  an L2 coefficient;
- :func:`discrete` ``[low, high]``: :math:`\lambda = \min(h, \lfloor l + (h
  - l + 1)\,\mathrm{sigmoid}(\tilde\lambda) \rfloor)`, every integer of the
  range taking an equal share of the sigmoid. The floor has no gradient:
  :math:`\tilde\lambda` moves only through the hypernetwork, as every
  hyperparameter does in STN.

**Perturbation.** :func:`perturb` draws :math:`\tilde\lambda_b =
\tilde\lambda + \sigma \odot \epsilon_b`, :math:`\epsilon_b \sim N(0, I)`,
one row per example of a batch (one shared row for hyperparameters with
``per_example=False``), and returns a :class:`Hyperparameters` record
holding both the rows (for the hypernetwork) and the constrained values (for
the regularizers). :func:`entropy` is the Gaussian entropy
:math:`\sum_h \log(\sigma_h \sqrt{2 \pi e})` that keeps :math:`\sigma` from
collapsing.

**Structured layers** (the paper's Sec. 4.2). :func:`hyper_dense` and
:func:`hyper_conv` compute, for each example :math:`b` with hypernetwork
input :math:`\tilde\lambda_b`,

.. math::

   \text{out}_b = s\,(W x_b + c) + (V_w \tilde\lambda_b) \odot (W' x_b)
                 + (V_c \tilde\lambda_b) \odot c',

i.e. the units of an ordinary layer ``(W, c)`` plus a second layer
``(W', c')`` whose units are gated by a linear function of the
hyperparameters: twice a layer's cost, not a weight matrix per example.
(``s`` is the official code's learnable scalar, initialised to 1; ``V``
starts at :math:`N(0, 0.01^2)`.) ``conv`` works for any number of spatial
axes (``NWC``, ``NHWC``, ...).

**Any model** (:func:`linear`). For a model given by a parameter pytree
``params`` (plain JAX or flax), :math:`\hat w_\phi(\tilde\lambda) =
w_0 + \sum_h \tilde\lambda_h U_h` (or a rank-:math:`r` version, :math:`U =
A B` with :math:`A \in \mathbb{R}^{H \times r}`), a pytree the model applies
as it is. Per-example hyperparameters then mean per-example weights:
``jax.vmap`` the model over the rows (fine for small models), or use
``per_example=False`` hyperparameters and row 0.

References:
  MacKay, Vicol, Lorraine, Duvenaud & Grosse, "Self-Tuning Networks: Bilevel
  optimization of hyperparameters using structured best-response
  functions", ICLR 2019, arXiv 1903.03088.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

KINDS = ("interval", "positive", "discrete")


@dataclasses.dataclass(frozen=True)
class Hyperparameter:
  """One hyperparameter: its kind, range and initial value.

  Build it with :func:`interval`, :func:`positive` or :func:`discrete`.

  Attributes:
    kind: ``"interval"``, ``"positive"`` or ``"discrete"``.
    init: the initial (constrained) value.
    low, high: the range (``interval``: open; ``discrete``: closed; unused
      for ``positive``).
    per_example: whether each example of a batch gets its own perturbed
      value (the paper's ``minibatch=True``) or the batch shares one.
  """
  kind: str
  init: float
  low: float = 0.0
  high: float = 1.0
  per_example: bool = True

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Hyperparameter kind must be one of {KINDS}; got "
                       f"{self.kind!r}.")
    for name in ("init", "low", "high"):
      value = getattr(self, name)
      if not isinstance(value, (int, float, np.number)) or isinstance(
          value, bool) or not math.isfinite(value):
        raise ValueError(f"Hyperparameter {name} must be a finite number; "
                         f"got {value!r}.")
    if not isinstance(self.per_example, bool):
      raise TypeError("Hyperparameter per_example must be True or False; "
                      f"got {self.per_example!r}.")
    if self.kind == "positive":
      if self.init <= 0:
        raise ValueError("A positive hyperparameter needs init > 0 (its "
                         f"softplus preimage is log(expm1(init))); got "
                         f"{self.init}.")
      return
    if not self.low < self.high:
      raise ValueError(f"An {self.kind} hyperparameter needs low < high; "
                       f"got low={self.low}, high={self.high}.")
    if self.kind == "interval" and not self.low < self.init < self.high:
      raise ValueError(
          f"An interval hyperparameter's init must lie strictly inside "
          f"(low, high) = ({self.low}, {self.high}), where the stretched "
          f"sigmoid has a finite preimage; got {self.init}.")
    if self.kind == "discrete":
      if any(float(v) != int(v) for v in (self.low, self.high, self.init)):
        raise ValueError("A discrete hyperparameter needs integer low, high "
                         f"and init; got low={self.low}, high={self.high}, "
                         f"init={self.init}.")
      if not self.low <= self.init <= self.high:
        raise ValueError(f"A discrete hyperparameter's init must lie in "
                         f"[{self.low}, {self.high}]; got {self.init}.")

  def constrain(self, unconstrained: jax.Array) -> jax.Array:
    """The value for an unconstrained number (elementwise)."""
    if self.kind == "positive":
      return jax.nn.softplus(unconstrained)
    if self.kind == "interval":
      return self.low + (self.high - self.low) * jax.nn.sigmoid(
          unconstrained)
    stretched = self.low + (self.high - self.low + 1) * jax.nn.sigmoid(
        unconstrained)
    return jnp.minimum(jnp.floor(stretched), self.high)

  def unconstrained_init(self) -> float:
    """The unconstrained number whose value is ``init``.

    For a discrete hyperparameter, the middle of the init's sigmoid share
    (so a small step does not change the integer).
    """
    if self.kind == "positive":
      return float(np.log(np.expm1(self.init)))
    if self.kind == "interval":
      p = (self.init - self.low) / (self.high - self.low)
    else:
      p = (self.init - self.low + 0.5) / (self.high - self.low + 1)
    return float(np.log(p) - np.log1p(-p))


def interval(init: float, low: float = 0.0, high: float = 1.0, *,
             per_example: bool = True) -> Hyperparameter:
  """A continuous hyperparameter in ``(low, high)`` (a stretched sigmoid)."""
  return Hyperparameter("interval", init, low, high, per_example)


def positive(init: float, *, per_example: bool = True) -> Hyperparameter:
  """A positive hyperparameter (softplus), e.g. an L2 coefficient."""
  return Hyperparameter("positive", init, 0.0, 1.0, per_example)


def discrete(init: int, low: int, high: int, *,
             per_example: bool = True) -> Hyperparameter:
  """An integer hyperparameter in ``[low, high]`` (floor of a stretch)."""
  return Hyperparameter("discrete", init, low, high, per_example)


@dataclasses.dataclass(frozen=True, init=False)
class HyperparameterSpace:
  """Named hyperparameters, in a fixed order (the columns of the rows).

  ``HyperparameterSpace({"dropout": interval(0.05, 0, 0.9), "l2":
  positive(1e-4)})``. Static configuration: hashable, compared by value.

  Attributes:
    entries: ``((name, Hyperparameter), ...)`` in column order.
  """
  entries: tuple[tuple[str, Hyperparameter], ...]

  def __init__(self, hyperparameters: Mapping[str, Hyperparameter]):
    if not isinstance(hyperparameters, Mapping) or not hyperparameters:
      raise ValueError(
          "HyperparameterSpace takes a non-empty mapping {name: "
          "Hyperparameter}, e.g. {'dropout': bilevel.best_response."
          f"interval(0.05, 0.0, 0.9)}}; got {hyperparameters!r}.")
    for name, hyper in hyperparameters.items():
      if not isinstance(name, str):
        raise TypeError(f"Hyperparameter names must be strings; got "
                        f"{name!r}.")
      if not isinstance(hyper, Hyperparameter):
        raise TypeError(
            f"Hyperparameter {name!r} must be built with bilevel."
            "best_response.interval, positive or discrete; got "
            f"{type(hyper).__name__}.")
    object.__setattr__(self, "entries", tuple(hyperparameters.items()))

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.entries)

  @property
  def size(self) -> int:
    """The number of hyperparameters :math:`H`."""
    return len(self.entries)

  @property
  def per_example(self) -> np.ndarray:
    """Boolean ``(H,)``: which columns are drawn per example."""
    return np.array([hyper.per_example for _, hyper in self.entries])

  def __getitem__(self, name: str) -> Hyperparameter:
    return dict(self.entries)[name]

  def init(self, dtype: Any = None) -> jax.Array:
    """The unconstrained vector ``(H,)`` of the initial values."""
    return jnp.asarray([hyper.unconstrained_init()
                        for _, hyper in self.entries], dtype=dtype)

  def constrain(self, unconstrained: jax.Array) -> dict[str, jax.Array]:
    """``{name: value}`` of unconstrained rows ``(..., H)`` (shape ``...``)."""
    unconstrained = jnp.asarray(unconstrained)
    if unconstrained.shape[-1:] != (self.size,):
      raise ValueError(
          f"Unconstrained hyperparameters must have a last axis of size "
          f"{self.size} ({', '.join(self.names)}); got shape "
          f"{unconstrained.shape}.")
    return {name: hyper.constrain(unconstrained[..., i])
            for i, (name, hyper) in enumerate(self.entries)}


class Hyperparameters(NamedTuple):
  """What the objectives of :func:`bilevel.solvers.stn` receive as ``x``.

  Attributes:
    unconstrained: rows ``(B, H)`` of unconstrained values, one per example
      of the batch: the hypernetwork's input.
    values: ``{name: (B,) array}`` of the constrained values of those rows
      (without gradient): what the regularizers use.
    key: a PRNG key for the regularizers' randomness (dropout masks, noise,
      shifts) in the training loss; ``None`` in the validation loss, which
      must apply no regularizer.
  """
  unconstrained: jax.Array
  values: dict
  key: Any


class HyperVariables(NamedTuple):
  """The upper variable of STN.

  Attributes:
    unconstrained: :math:`\\tilde\\lambda`, ``(H,)``.
    raw_scale: :math:`\\rho` with :math:`\\sigma = \\mathrm{softplus}(\\rho)`,
      ``(H,)``: the perturbation scale.
  """
  unconstrained: jax.Array
  raw_scale: jax.Array

  @property
  def scale(self) -> jax.Array:
    """:math:`\\sigma = \\mathrm{softplus}(\\rho)`."""
    return jax.nn.softplus(self.raw_scale)


def init_variables(space: HyperparameterSpace, scale: float = 0.5,
                   dtype: Any = None) -> HyperVariables:
  """The STN upper variable at the space's initial values.

  Args:
    space: the hyperparameters.
    scale: the initial perturbation scale :math:`\\sigma_0` (the paper's
      ``perturb_scale``, 0.5 for the CNNs), a positive number.
    dtype: of the arrays (default: JAX's default float).
  """
  if not isinstance(space, HyperparameterSpace):
    raise TypeError("init_variables expects a bilevel.best_response."
                    f"HyperparameterSpace; got {type(space).__name__}.")
  if not (isinstance(scale, (int, float)) and math.isfinite(scale) and
          scale > 0):
    raise ValueError(f"scale must be a positive number; got {scale!r}.")
  unconstrained = space.init(dtype)
  raw = float(np.log(np.expm1(scale)))
  return HyperVariables(unconstrained,
                        jnp.full_like(unconstrained, raw))


def perturb(space: HyperparameterSpace, unconstrained: jax.Array,
            scale: jax.Array | None, key: jax.Array | None,
            num_examples: int, regularizer_key: Any = None
            ) -> Hyperparameters:
  r"""Rows :math:`\tilde\lambda + \sigma \odot \epsilon_b` for a batch.

  Args:
    space: the hyperparameters.
    unconstrained: :math:`\tilde\lambda`, ``(H,)``.
    scale: :math:`\sigma`, ``(H,)``, or ``None`` for no perturbation
      (every row is :math:`\tilde\lambda`).
    key: PRNG key of :math:`\epsilon` (unused without ``scale``).
    num_examples: :math:`B`, the rows.
    regularizer_key: stored as :attr:`Hyperparameters.key`.

  Returns:
    :class:`Hyperparameters` with ``(B, H)`` rows; columns with
    ``per_example=False`` share one draw. The values carry no gradient.
  """
  rows = jnp.broadcast_to(unconstrained, (num_examples, space.size))
  if scale is not None:
    noise = jax.random.normal(key, (num_examples, space.size), rows.dtype)
    shared = jnp.asarray(~space.per_example)
    noise = jnp.where(shared, noise[:1], noise)
    rows = rows + scale * noise
  values = jax.lax.stop_gradient(space.constrain(rows))
  return Hyperparameters(rows, values, regularizer_key)


def entropy(scale: jax.Array) -> jax.Array:
  r""":math:`\sum_h \log(\sigma_h \sqrt{2 \pi e})`, the entropy of
  :math:`N(\tilde\lambda, \mathrm{diag}(\sigma^2))`."""
  return jnp.sum(jnp.log(scale) + 0.5 * jnp.log(2 * jnp.pi * jnp.e))


# --------------------------------------------------------------------------
# Structured best-response layers.


def _uniform(key, shape, fan_in, dtype):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _hyper_layer_params(key, kernel_shape, fan_in, out_features, num_hyper,
                        dtype):
  dtype = jnp.result_type(float) if dtype is None else dtype
  keys = jax.random.split(key, 5)
  return {
      "kernel": _uniform(keys[0], kernel_shape, fan_in, dtype),
      "bias": _uniform(keys[1], (out_features,), fan_in, dtype),
      "scale": jnp.ones((), dtype),
      "hyper_kernel": _uniform(keys[2], kernel_shape, fan_in, dtype),
      "hyper_bias": _uniform(keys[3], (out_features,), fan_in, dtype),
      "gate": 0.01 * jax.random.normal(keys[4], (num_hyper, 2 * out_features),
                                       dtype),
  }


def _check_int(name, value, minimum=1):
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (
      value < minimum):
    raise ValueError(f"{name} must be an integer >= {minimum}; got "
                     f"{value!r}.")


def hyper_dense_init(key: jax.Array, in_features: int, out_features: int,
                     num_hyper: int, dtype: Any = None) -> dict:
  """Parameters of :func:`hyper_dense`.

  ``kernel``/``hyper_kernel`` ``(in, out)`` and the biases uniform in
  :math:`\\pm 1/\\sqrt{\\text{in}}` (PyTorch's ``Linear``), ``scale`` 1,
  ``gate`` :math:`V = [V_w, V_c]` ``(H, 2 out)`` from :math:`N(0, 0.01^2)`;
  ``dtype`` defaults to JAX's default float.
  """
  for name, value in (("in_features", in_features),
                      ("out_features", out_features),
                      ("num_hyper", num_hyper)):
    _check_int(name, value)
  return _hyper_layer_params(key, (in_features, out_features), in_features,
                             out_features, num_hyper, dtype)


def _gates(params, hyper_inputs, batch_shape):
  out_features = params["bias"].shape[0]
  hyper_inputs = jnp.asarray(hyper_inputs)
  if hyper_inputs.ndim != 2 or hyper_inputs.shape[0] != batch_shape:
    raise ValueError(
        "hyper_inputs must be rows (B, H) matching the B examples of the "
        f"inputs ({batch_shape}); got shape {hyper_inputs.shape}.")
  if hyper_inputs.shape[1] != params["gate"].shape[0]:
    raise ValueError(
        f"hyper_inputs have {hyper_inputs.shape[1]} columns; the layer was "
        f"built for num_hyper={params['gate'].shape[0]}.")
  gates = hyper_inputs @ params["gate"]
  return gates[:, :out_features], gates[:, out_features:]


def hyper_dense(params: dict, inputs: jax.Array,
                hyper_inputs: jax.Array | None) -> jax.Array:
  r"""A dense layer whose units are gated by the hyperparameters.

  .. math::

     \text{out}_b = s\,(x_b W + c) + (\tilde\lambda_b V_w) \odot (x_b W')
                    + (\tilde\lambda_b V_c) \odot c'

  Args:
    params: from :func:`hyper_dense_init`.
    inputs: ``(B, in)``.
    hyper_inputs: ``(B, H)`` unconstrained hyperparameter rows
      (:attr:`Hyperparameters.unconstrained`), or ``None`` for the plain
      layer :math:`s (x W + c)` alone (a network at fixed hyperparameters,
      at half the cost).

  Returns:
    ``(B, out)``.
  """
  plain = inputs @ params["kernel"] + params["bias"]
  if hyper_inputs is None:
    return params["scale"] * plain
  weight_gate, bias_gate = _gates(params, hyper_inputs, inputs.shape[0])
  hyper = inputs @ params["hyper_kernel"]
  return (params["scale"] * plain + weight_gate * hyper +
          bias_gate * params["hyper_bias"])


def hyper_conv_init(key: jax.Array, in_channels: int, out_channels: int,
                    kernel_size: int | Sequence[int], num_hyper: int,
                    dtype: Any = None) -> dict:
  """Parameters of :func:`hyper_conv`.

  Args:
    kernel_size: one int per spatial axis (e.g. ``(3, 3)`` for images,
      ``(5,)`` for signals); an int means one spatial axis.

  Kernels have the layout ``(*kernel_size, in, out)``; initialisation as
  :func:`hyper_dense_init` with ``fan_in = in * prod(kernel_size)``.
  """
  kernel_size = ((kernel_size,) if isinstance(kernel_size, (int, np.integer))
                 else tuple(kernel_size))
  for name, value in (("in_channels", in_channels),
                      ("out_channels", out_channels),
                      ("num_hyper", num_hyper)):
    _check_int(name, value)
  for size in kernel_size:
    _check_int("kernel_size", size)
  fan_in = in_channels * int(np.prod(kernel_size))
  return _hyper_layer_params(
      key, kernel_size + (in_channels, out_channels), fan_in, out_channels,
      num_hyper, dtype)


def _conv(inputs, kernel, strides, padding):
  num_spatial = kernel.ndim - 2
  spatial = "".join("HWD"[:num_spatial]) if num_spatial <= 3 else None
  if spatial is None:
    raise ValueError("hyper_conv supports 1 to 3 spatial axes.")
  numbers = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  return jax.lax.conv_general_dilated(
      inputs, kernel, window_strides=(strides,) * num_spatial
      if isinstance(strides, int) else tuple(strides), padding=padding,
      dimension_numbers=numbers)


def hyper_conv(params: dict, inputs: jax.Array,
               hyper_inputs: jax.Array | None, *,
               strides: int | Sequence[int] = 1,
               padding: str = "SAME") -> jax.Array:
  r"""A convolution whose output channels are gated by the hyperparameters.

  As :func:`hyper_dense` with :math:`W x` a convolution; the gates of
  example :math:`b` multiply its channels at every position.

  Args:
    params: from :func:`hyper_conv_init`.
    inputs: ``(B, *spatial, in)`` (channels last).
    hyper_inputs: ``(B, H)``, or ``None`` for the plain convolution.
    strides, padding: as ``jax.lax.conv_general_dilated``.

  Returns:
    ``(B, *spatial', out)``.
  """
  if inputs.ndim != params["kernel"].ndim:
    raise ValueError(
        f"hyper_conv with a kernel of {params['kernel'].ndim - 2} spatial "
        f"axes expects inputs (B, *spatial, channels) of rank "
        f"{params['kernel'].ndim}; got shape {inputs.shape}.")
  plain = _conv(inputs, params["kernel"], strides, padding) + params["bias"]
  if hyper_inputs is None:
    return params["scale"] * plain
  weight_gate, bias_gate = _gates(params, hyper_inputs, inputs.shape[0])
  expand = (slice(None),) + (None,) * (inputs.ndim - 2) + (slice(None),)
  hyper = _conv(inputs, params["hyper_kernel"], strides, padding)
  return (params["scale"] * plain + weight_gate[expand] * hyper +
          bias_gate[expand] * params["hyper_bias"])


# --------------------------------------------------------------------------
# A best response for any parameter pytree.


class BestResponse(NamedTuple):
  """A best-response model of a parameter pytree.

  Attributes:
    init: ``init(params, key=None) -> phi``: the hypernetwork's parameters,
      whose response at every :math:`\\tilde\\lambda` is ``params`` at
      first.
    apply: ``apply(phi, hyper_row) -> params`` for one unconstrained row
      ``(H,)``; vmap it (or the model around it) over ``(B, H)`` rows.
  """
  init: Callable[..., PyTree]
  apply: Callable[[PyTree, jax.Array], PyTree]


def linear(num_hyper: int, *, rank: int | None = None) -> BestResponse:
  r"""A linear (or low-rank) best response of any parameter pytree.

  .. math::

     \hat w_\phi(\tilde\lambda) = w_0 + \sum_{h=1}^H \tilde\lambda_h U_h,
     \qquad\text{or with rank } r:\quad
     w_0 + \sum_{k=1}^r (\tilde\lambda^\top A)_k B_k,

  every :math:`U_h`, :math:`B_k` shaped like the parameters. Near the
  current :math:`\tilde\lambda` this is the first-order Taylor expansion
  of :math:`w^*`, which is what STN's perturbed training fits. The full
  form stores :math:`H` extra copies of the parameters, the low-rank form
  :math:`r` (and :math:`A \in \mathbb{R}^{H \times r}`, drawn from
  :math:`N(0, 1/H)` so the :math:`B_k` get gradients; :math:`U`, :math:`B`
  start at zero).

  **Conditioning.** As in the paper, the response reads the raw
  :math:`\tilde\lambda`, not :math:`\tilde\lambda` minus its current
  value: far from 0 (e.g. :math:`\mathrm{softplus}^{-1}(10^{-4}) \approx
  -9.2`), :math:`w_0` and :math:`U` are strongly coupled and SGD fits the
  slope slowly (the perturbation gives it curvature of order
  :math:`\sigma^2`). Decaying step sizes help (``tests/test_stn.py``);
  Bae & Grosse (Delta-STN, NeurIPS 2020) centre the response instead.

  Args:
    num_hyper: :math:`H`.
    rank: ``None`` for the full linear response, or :math:`r \ge 1`.
  """
  _check_int("num_hyper", num_hyper)
  if rank is not None:
    _check_int("rank", rank)

  def init(params: PyTree, key: jax.Array | None = None) -> dict:
    width = num_hyper if rank is None else rank
    slopes = jax.tree.map(
        lambda leaf: jnp.zeros((width,) + jnp.shape(leaf),
                               jnp.result_type(leaf)), params)
    if rank is None:
      return {"base": params, "slope": slopes}
    if key is None:
      raise ValueError("A low-rank best response needs a key to draw A: "
                       "init(params, key).")
    dtype = jnp.result_type(*jax.tree.leaves(params))
    mixing = jax.random.normal(key, (num_hyper, rank), dtype) / math.sqrt(
        num_hyper)
    return {"base": params, "slope": slopes, "mixing": mixing}

  def apply(phi: dict, hyper_row: jax.Array) -> PyTree:
    hyper_row = jnp.asarray(hyper_row)
    if hyper_row.shape != (num_hyper,):
      raise ValueError(f"apply takes one row of {num_hyper} unconstrained "
                       f"hyperparameters; got shape {hyper_row.shape}. "
                       "vmap it over (B, H) rows.")
    coefficients = (hyper_row if rank is None
                    else hyper_row @ phi["mixing"])
    return jax.tree.map(
        lambda base, slope: base + jnp.tensordot(
            coefficients.astype(slope.dtype), slope, axes=1),
        phi["base"], phi["slope"])

  return BestResponse(init, apply)
