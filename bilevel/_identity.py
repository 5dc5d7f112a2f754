"""A stable digest of Python and JAX values: what a run was built from.

:func:`digest` is a SHA-256 of a value's *contents*, the same in every
Python process that builds the value the same way (no memory address, no
``id()`` and no ``hash()`` of a string enters it). :mod:`bilevel.checkpoint`
uses it to tell whether a checkpoint belongs to the run that reads it: the
solver's hyperparameters (optax optimizers, schedules, linear solvers), the
problem's functions and the run's arrays.

What is seen, by kind of value:

* ``None``, bools, ints, floats, complex numbers, strings and bytes: by type
  and value (``1``, ``1.0`` and ``True`` differ; floats exactly, ``-0.0`` is
  not ``0.0``).
* NumPy arrays and scalars, JAX arrays: by kind (NumPy or JAX), dtype, shape
  and bytes (a JAX array's weak type too; a typed PRNG key by its
  implementation and ``jax.random.key_data``). Object arrays element-wise.
* Tuples, lists, dicts (in the order of their keys' digests), sets and
  frozensets (in the order of their elements' digests), NamedTuples and
  dataclasses (their fields): recursively, with the type's qualified name.
* Python functions, by a stable identity: module and qualified name, the code
  object (``co_code``, ``co_consts`` with nested code objects, ``co_names``,
  ``co_varnames``, argument counts and flags; not the file name nor the line
  numbers, so moving a function within its file keeps its digest), the
  defaults and keyword defaults, the contents of its closure cells
  (recursively) and the module-level globals its code and nested code read
  (names of ``co_names`` found in ``fn.__globals__``): modules by name, types
  by qualified name, functions and other callables recursively, numbers,
  strings, arrays and tuples of them by value; any other global (a dict, a
  list, an object) by its type only, because it is mutable state that may
  change while the program runs. Builtins are not globals and are skipped.
  A function's ``__wrapped__`` (``functools.wraps``) is included.
* ``functools.partial`` (and ``jax.tree_util.Partial``): function, arguments
  and keywords. Bound methods: ``__func__`` and ``__self__``. Other objects
  with ``__wrapped__`` (``jax.jit``, ``functools.lru_cache``): the wrapped
  function and their public attributes (a ``jax.custom_jvp``'s ``jvp``
  rule; ``jit``'s options, e.g. ``static_argnums``, are not seen).
  Builtin functions and methods: module, qualified name and the object they
  are bound to. Classes: module and qualified name (not their code).
  Modules: name. Enum members: class and name.
* An optax ``GradientTransformation`` is a NamedTuple of ``init``/``update``
  closures, so the rules above see its kind (the closures' names and code)
  and its hyperparameters (their cells): ``optax.sgd(0.05)`` and
  ``optax.sgd(0.5)`` differ, as do ``optax.adam(1e-3)`` and
  ``optax.sgd(1e-3)``; schedules likewise.
* Any other object: its type's qualified name and ``vars(obj)`` when it has
  one; otherwise its ``repr`` when that holds no memory address
  (``" at 0x"``); otherwise its type's name only.

Cycles contribute a back-reference to the first visit (lists, dicts, sets,
functions and objects are visited once per digest: a value shared by two
places is a back-reference the second time, so two equal but distinct
optimizers digest differently from one optimizer used twice); recursion
stops at a depth of ``MAX_DEPTH`` with a marker and the type's name.

Not seen: a function's behaviour that depends on state outside its code,
closure and globals as described (a global dict or object it reads or
mutates, attributes of a module it reads, e.g. a configuration flag such as
``jax_enable_x64``, files, the environment, the time), the code of a
function reached through a module attribute (``jnp.sum``, ``mylib.f``: only
the names), the methods of classes, library versions, and ``jax.jit``
options. Anything beyond ``MAX_DEPTH`` levels. An object whose ``repr``
carries some other process-specific number (not ``" at 0x"``) would digest
differently in another process.

Under a JAX transformation a tracer (a value of ``jit``/``vmap``/``grad``)
has no value to digest: with ``tracers=[]`` it is appended to that list and
only its position, shape and dtype are mixed in; without a list,
:func:`digest` raises ``TypeError``.

Arrays are hashed by value: the cost is a copy to host memory and SHA-256
over their bytes (about 2 s per GB on CPU), once per array per call.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import struct
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MAX_DEPTH", "digest"]

MAX_DEPTH = 64

_BUILTIN_CALLABLES = (types.BuiltinFunctionType, types.BuiltinMethodType,
                      types.MethodWrapperType, types.WrapperDescriptorType,
                      types.MethodDescriptorType,
                      types.ClassMethodDescriptorType)
_SCALARS = (type(None), bool, int, float, complex, str, bytes)
_INDEPENDENT = (types.ModuleType, type)


def _qualname(cls: type) -> str:
  """``module.QualifiedName`` of a class."""
  module = getattr(cls, "__module__", None)
  return f"{module}.{getattr(cls, '__qualname__', cls.__name__)}"


def _scalar_bytes(value) -> bytes:
  if isinstance(value, bool) or value is None:
    return repr(bool(value) if value is not None else None).encode()
  if isinstance(value, int):
    return str(int(value)).encode()
  if isinstance(value, float):
    return float(value).hex().encode()
  if isinstance(value, complex):
    return f"{value.real.hex()},{value.imag.hex()}".encode()
  if isinstance(value, str):
    return str(value).encode("utf-8", "surrogatepass")
  return bytes(value)


class _Digest:
  """One digest computation: a SHA-256 fed a token stream."""

  def __init__(self, tracers: list | None, positions: dict | None = None,
               arrays: dict | None = None):
    self._hash = hashlib.sha256()
    self._tracers = tracers
    self._positions = ({id(t): i for i, t in enumerate(tracers)}
                       if positions is None and tracers is not None
                       else positions)
    self._seen: dict[int, tuple[int, Any]] = {}  # id -> (ordinal, object)
    self._arrays = {} if arrays is None else arrays  # id -> (bytes, object)
    self._code: dict[int, tuple[bytes, Any]] = {}

  def hexdigest(self) -> str:
    return self._hash.hexdigest()

  # Tokens: a tag and a length-prefixed payload, so that the stream is
  # unambiguous (no two values give the same stream).
  def _atom(self, tag: str, payload: bytes = b"") -> None:
    tag_bytes = tag.encode()
    self._hash.update(struct.pack("<I", len(tag_bytes)) + tag_bytes +
                      struct.pack("<Q", len(payload)) + payload)

  def _open(self, tag: str) -> None:
    self._atom("(" + tag)

  def _close(self) -> None:
    self._atom(")")

  def _sub(self, value, depth: int) -> bytes:
    """The digest of ``value`` alone (to sort the items of dicts and sets)."""
    sub = _Digest(self._tracers, self._positions, self._arrays)
    sub.visit(value, depth)
    return sub._hash.digest()

  def _first_visit(self, value) -> bool:
    """Records ``value``; on a later visit emits a back-reference instead."""
    seen = self._seen.get(id(value))
    if seen is not None and seen[1] is value:
      self._atom("backref", str(seen[0]).encode())
      return False
    self._seen[id(value)] = (len(self._seen), value)
    return True

  def visit(self, value, depth: int = 0) -> None:
    """Feeds ``value`` to the hash (the rules of the module docstring)."""
    if depth > MAX_DEPTH:
      self._atom("depth-limit", _qualname(type(value)).encode())
      return
    depth += 1
    if isinstance(value, jax.core.Tracer):
      self._tracer(value)
    elif isinstance(value, _SCALARS):
      self._atom("scalar:" + _qualname(type(value)), _scalar_bytes(value))
    elif isinstance(value, (np.ndarray, np.generic, jax.Array)):
      self._array(value, depth)
    elif isinstance(value, tuple):
      fields = getattr(type(value), "_fields", None)
      self._open(("namedtuple:" if fields is not None else "tuple:") +
                 _qualname(type(value)))
      if fields is not None:
        self.visit(tuple(fields), depth)
      for item in value:
        self.visit(item, depth)
      self._close()
    elif isinstance(value, list):
      if self._first_visit(value):
        self._open("list:" + _qualname(type(value)))
        for item in value:
          self.visit(item, depth)
        self._close()
    elif isinstance(value, dict):
      if self._first_visit(value):
        self._dict("dict:" + _qualname(type(value)), value, depth)
    elif isinstance(value, (set, frozenset)):
      if isinstance(value, frozenset) or self._first_visit(value):
        self._open("set:" + _qualname(type(value)))
        for item in sorted(self._sub(item, depth) for item in value):
          self._atom("item", item)
        self._close()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
      if self._first_visit(value):
        self._open("dataclass:" + _qualname(type(value)))
        for field in dataclasses.fields(value):
          self._atom("field", field.name.encode())
          self.visit(getattr(value, field.name, None), depth)
        self._close()
    elif isinstance(value, types.FunctionType):
      if self._first_visit(value):
        self._function(value, depth)
    elif isinstance(value, types.MethodType):
      if self._first_visit(value):
        self._open("method")
        self.visit(value.__func__, depth)
        self.visit(value.__self__, depth)
        self._close()
    elif isinstance(value, functools.partial):
      if self._first_visit(value):
        self._open("partial:" + _qualname(type(value)))
        self.visit(value.func, depth)
        self.visit(value.args, depth)
        self._dict("keywords", value.keywords or {}, depth)
        self._close()
    elif isinstance(value, types.CodeType):
      self._code_object(value)
    elif isinstance(value, types.ModuleType):
      self._atom("module", value.__name__.encode())
    elif isinstance(value, type):
      self._atom("type", _qualname(value).encode())
    elif isinstance(value, _BUILTIN_CALLABLES):
      self._builtin(value, depth)
    elif isinstance(value, enum.Enum):
      self._atom("enum:" + _qualname(type(value)), value.name.encode())
    elif isinstance(value, jax.ShapeDtypeStruct):
      self._atom("shape-dtype", f"{value.shape}{value.dtype}".encode())
    else:
      self._object(value, depth)

  def _tracer(self, value) -> None:
    if self._tracers is None:
      raise TypeError(
          "bilevel digest: cannot digest a JAX tracer (a value being "
          f"transformed by jit, vmap or grad: {type(value).__name__} of "
          f"shape {jnp.shape(value)}) by value; pass tracers=[] to collect "
          "it and digest only its shape, dtype and position.")
    position = self._positions.get(id(value))
    if position is None or self._tracers[position] is not value:
      position = len(self._tracers)
      self._tracers.append(value)
      self._positions[id(value)] = position
    self._atom("tracer", f"{position}:{jnp.shape(value)}:"
                         f"{jnp.result_type(value)}".encode())

  def _array(self, value, depth: int) -> None:
    cached = self._arrays.get(id(value))
    if cached is not None and cached[1] is value:
      self._atom("array", cached[0])
      return
    if isinstance(value, jax.Array):
      head = "jax"
      if jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
        head += f":key:{jax.random.key_impl(value)}"
        value_data = jax.random.key_data(value)
      else:
        head += f":weak={bool(getattr(value, 'weak_type', False))}"
        value_data = value
      array = np.asarray(jax.device_get(value_data))
    else:
      head = "numpy" if isinstance(value, np.ndarray) else "numpy-scalar"
      array = np.asarray(value)
    head += f":{array.dtype.str}:{array.dtype.name}:{array.shape}"
    if array.dtype.hasobject:
      # Pointers, not values: element-wise.
      self._open("object-array:" + head)
      for item in array.ravel().tolist():
        self.visit(item, depth)
      self._close()
      return
    payload = hashlib.sha256(np.ascontiguousarray(array).tobytes())
    token = head.encode() + b"|" + payload.digest()
    self._arrays[id(value)] = (token, value)
    self._atom("array", token)

  def _dict(self, tag: str, value: dict, depth: int) -> None:
    self._open(tag)
    keyed = sorted(((self._sub(key, depth), key) for key in value),
                   key=lambda pair: pair[0])
    for key_digest, key in keyed:
      self._atom("key", key_digest)
      self.visit(value[key], depth)
    self._close()

  def _code_object(self, code: types.CodeType) -> None:
    cached = self._code.get(id(code))
    if cached is None or cached[1] is not code:
      sub = _Digest(None)
      sub._open("code")
      sub._atom("name", code.co_qualname.encode() if hasattr(
          code, "co_qualname") else code.co_name.encode())
      sub._atom("bytecode", code.co_code)
      sub._atom("counts", f"{code.co_argcount},{code.co_posonlyargcount},"
                          f"{code.co_kwonlyargcount},{code.co_flags}".encode())
      sub.visit(code.co_names)
      sub.visit(code.co_varnames)
      sub.visit(code.co_freevars)
      sub._open("consts")
      for const in code.co_consts:
        sub.visit(const)  # nested code objects are CodeType: recursive
      sub._close()
      sub._close()
      cached = (sub._hash.digest(), code)
      self._code[id(code)] = cached
    self._atom("code", cached[0])

  def _function(self, fn: types.FunctionType, depth: int) -> None:
    self._open("function")
    self._atom("module", str(fn.__module__).encode())
    self._atom("qualname", fn.__qualname__.encode())
    self._code_object(fn.__code__)
    self.visit(fn.__defaults__, depth)
    self._dict("kwdefaults", fn.__kwdefaults__ or {}, depth)
    self._open("closure")
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
      self._atom("cell", name.encode())
      try:
        contents = cell.cell_contents
      except ValueError:  # an empty cell (a name not yet bound)
        self._atom("empty-cell")
      else:
        self.visit(contents, depth)
    self._close()
    self._open("globals")
    fn_globals = fn.__globals__
    for name in _global_names(fn.__code__):
      if name in fn_globals:
        self._atom("global", name.encode())
        self._global(fn_globals[name], depth)
    self._close()
    wrapped = fn.__dict__.get("__wrapped__")
    if wrapped is not None:
      self._open("wrapped")
      self.visit(wrapped, depth)
      self._close()
    self._close()

  def _global(self, value, depth: int) -> None:
    """A module-level global a function reads (mutable state: its type)."""
    if (isinstance(value, (_SCALARS, np.ndarray, np.generic, jax.Array,
                           types.ModuleType, type, types.FunctionType,
                           types.MethodType, functools.partial,
                           enum.Enum) + _BUILTIN_CALLABLES)
        or _wrapped(value) is not None):
      self.visit(value, depth)
    elif isinstance(value, (tuple, frozenset)):
      if depth > MAX_DEPTH:
        self._atom("depth-limit", _qualname(type(value)).encode())
        return
      self._open("global-tuple:" + _qualname(type(value)))
      items = value if isinstance(value, tuple) else sorted(
          value, key=lambda item: self._sub(item, depth))
      for item in items:
        self._global(item, depth + 1)
      self._close()
    else:
      self._atom("global-of-type", _qualname(type(value)).encode())

  def _builtin(self, value, depth: int) -> None:
    self._open("builtin:" + _qualname(type(value)))
    self._atom("module", str(getattr(value, "__module__", None)).encode())
    self._atom("name", str(getattr(value, "__qualname__",
                                   getattr(value, "__name__", ""))).encode())
    owner = getattr(value, "__self__", None)
    if owner is not None and not isinstance(owner, _INDEPENDENT):
      self.visit(owner, depth)
    self._close()

  def _object(self, value, depth: int) -> None:
    try:
      attributes = vars(value)
    except TypeError:
      attributes = None
    wrapped = _wrapped(value)
    if wrapped is not None and wrapped is not value:
      if self._first_visit(value):
        self._open("wrapper:" + _qualname(type(value)))
        self.visit(wrapped, depth)
        public = {name: item for name, item in (attributes or {}).items()
                  if not name.startswith("_")}
        self._dict("attributes", public, depth)
        self._close()
      return
    if isinstance(attributes, dict):
      if self._first_visit(value):
        self._dict("object:" + _qualname(type(value)), attributes, depth)
      return
    try:
      text = repr(value)
    except Exception:  # pylint: disable=broad-except
      text = " at 0x"
    if " at 0x" in text:
      self._atom("opaque", _qualname(type(value)).encode())
    else:
      self._atom("repr:" + _qualname(type(value)), text.encode())


def _wrapped(value):
  """``value.__wrapped__``, or ``None`` (also if reading it fails)."""
  try:
    return getattr(value, "__wrapped__", None)
  except Exception:  # pylint: disable=broad-except
    return None


def _global_names(code: types.CodeType) -> list[str]:
  """``co_names`` of ``code`` and of its nested code objects, in order."""
  names: dict[str, None] = {}
  stack = [code]
  while stack:
    current = stack.pop(0)
    names.update(dict.fromkeys(current.co_names))
    stack.extend(const for const in current.co_consts
                 if isinstance(const, types.CodeType))
  return list(names)


def digest(value: Any, *, tracers: list | None = None) -> str:
  """The SHA-256 (hex) of ``value``'s contents, stable across processes.

  Args:
    value: any Python or JAX value (the module docstring lists what is seen
      of each kind).
    tracers: a list to collect JAX tracers found in ``value`` (under
      ``jit``/``vmap``): each is appended (once) and only its position in the
      list, shape and dtype enter the digest. ``None``: a tracer raises.

  Returns:
    64 hexadecimal digits.

  Raises:
    TypeError: if ``value`` holds a tracer and ``tracers`` is ``None``.
  """
  hasher = _Digest(tracers)
  hasher.visit(value)
  return hasher.hexdigest()
