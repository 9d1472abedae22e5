"""Importance scores of adapter components (SPEC.md section 3).

Each kind of score is one object in the shape of an optax transformation
(`Sensitivity`, `Frobenius`, or a subclass of `Importance` of your own):

- `init(layers)`: the state it keeps, as `StateSpec`s (the optimizer makes
  them variables, so they are saved, restored and carried through JAX's
  pure train step);
- `update(state, layers, grads)`: the new state from this step's
  gradients of the task loss (the optimizer takes the orthogonality
  penalty's part out, so that a layer scores for what it does for the
  task), in `keras.ops` with no Python control flow on tensor values
  and no host round trip, so it runs inside the compiled train step on
  every backend;
- `accepts(grads, new_state)`: whether to keep this step's new state (by
  default when every gradient is finite: an overflowed step leaves the
  state as it was);
- `scores(state, layers, alive)`: per layer, the component scores the
  allocator ranks and the layer's total, in NumPy on the host (the state
  read off the device once per mask step).

`AdaLoRAOptimizer` calls `update` in its `apply`; `RankAllocator` calls
`scores` through `AdaLoRAOptimizer.scores_on_host`. The pure functions below
are their maths.

Scores are kept in float32 whatever the parameters' dtype: `|theta * grad|`
is tiny and smoothed over many steps, which bfloat16 would round away.
"""

import numbers

import numpy as np
from keras import ops

from keras_adalora import _distribution
from keras_adalora._arrays import float32 as _float32




def validate_betas(beta1, beta2):
    """Checks the two smoothing factors of the importance scores.

    Args:
        beta1: smoothing of the importance `I_bar`, a real number in `[0, 1)`.
        beta2: smoothing of the uncertainty `U_bar`, a real number in `[0, 1)`.

    Raises:
        ValueError: naming the first argument that is not a real number in
            `[0, 1)`.

    Example:

    >>> validate_betas(0.85, 0.85)
    """
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        is_real = isinstance(value, numbers.Real) and not isinstance(
            value, bool
        )
        if not is_real or not 0.0 <= value < 1.0:
            raise ValueError(
                f"`{name}` must be a real number in [0, 1) (an exponential "
                f"moving average factor; the paper uses 0.85), got "
                f"{name}={value!r}."
            )


def sensitivity_update(param, grad, ipt_bar, unc_bar, beta1, beta2):
    """One step of the smoothed sensitivity and its uncertainty.

    For every entry (SPEC.md section 3, the paper's eq. 8 and 9):

        I      = |param * grad|
        I_bar' = beta1 * I_bar + (1 - beta1) * I
        U_bar' = beta2 * U_bar + (1 - beta2) * |I - I_bar'|

    `U_bar'` uses the updated `I_bar'`, as the paper's reference code does.
    The betas are not validated here (it would run at every trace); check
    them once with `validate_betas`.

    Args:
        param: the parameter, a tensor or Keras Variable of any float dtype.
        grad: its gradient, same shape.
        ipt_bar: the previous `I_bar`, same shape.
        unc_bar: the previous `U_bar`, same shape.
        beta1: a Python float in `[0, 1)`.
        beta2: a Python float in `[0, 1)`.

    Returns:
        The tuple `(new_ipt_bar, new_unc_bar)` of float32 tensors.

    Example:

    >>> import numpy as np
    >>> ipt, unc = sensitivity_update(np.array([2.0]), np.array([-3.0]),
    ...                               np.zeros(1), np.zeros(1), 0.5, 0.5)
    >>> ops.convert_to_numpy(ipt).tolist(), ops.convert_to_numpy(unc).tolist()
    ([3.0], [1.5])
    """
    sensitivity = ops.abs(_float32(param) * _float32(grad))
    new_ipt_bar = beta1 * _float32(ipt_bar) + (1.0 - beta1) * sensitivity
    deviation = ops.abs(sensitivity - new_ipt_bar)
    new_unc_bar = beta2 * _float32(unc_bar) + (1.0 - beta2) * deviation
    return new_ipt_bar, new_unc_bar


def element_score(ipt_bar, unc_bar):
    """The score of every entry, `s = I_bar * U_bar` (SPEC.md section 3).

    A host function (NumPy): the allocator reads the scores off the device
    once per mask step and ranks components there.

    Args:
        ipt_bar: the smoothed importance `I_bar`, an array.
        unc_bar: the uncertainty `U_bar`, same shape.

    Returns:
        A float32 NumPy array of the same shape.

    Example:

    >>> element_score([2.0, 3.0], [0.5, 0.0]).tolist()
    [1.0, 0.0]
    """
    return np.asarray(ipt_bar, "float32") * np.asarray(unc_bar, "float32")


def component_scores(score_a, score_lam, score_b):
    """The score of each rank-1 component `(A[:, i], lam[i], B[i, :])`.

    `score_i = s(lam[i]) + mean_j s(A[j, i]) + mean_j s(B[i, j])`
    (SPEC.md section 3, the paper's eq. 10). A host function (NumPy).

    Args:
        score_a: the entry scores of `A`, shape `(d_in, r)`.
        score_lam: the entry scores of `lam`, shape `(r,)`.
        score_b: the entry scores of `B`, shape `(r, d_out)`.

    Returns:
        A float32 NumPy array of shape `(r,)`.

    Example:

    >>> component_scores(np.ones((4, 2)), np.array([1.0, 0.0]),
    ...                  np.full((2, 3), 2.0)).tolist()
    [4.0, 3.0]
    """
    return (
        np.asarray(score_lam, "float32")
        + np.asarray(score_a, "float32").mean(axis=0)
        + np.asarray(score_b, "float32").mean(axis=1)
    )


def frobenius_update(delta_norm, previous, beta1):
    """One step of the design note's layer score (SPEC.md section 3).

    `s_l' = beta1 * s_l + (1 - beta1) * ||delta_W_l||_F`.

    Args:
        delta_norm: `||delta_W_l||_F` at this step, a scalar tensor.
        previous: the previous smoothed score `s_l`.
        beta1: a Python float in `[0, 1)`.

    Returns:
        The new smoothed score, a float32 tensor.

    Example:

    >>> float(ops.convert_to_numpy(frobenius_update(4.0, 2.0, 0.75)))
    2.5
    """
    return beta1 * _float32(previous) + (1.0 - beta1) * _float32(delta_norm)


def frobenius_component_scores(lam):
    """Component scores inside a layer for the frobenius variant, `|lam|`.

    The layer-level score decides how much rank a layer keeps; inside the
    layer the components with the largest singular values `|lam[i]|` stay.
    A host function (NumPy).

    Args:
        lam: the layer's singular values, shape `(r,)`.

    Returns:
        A float32 NumPy array of shape `(r,)`.

    Example:

    >>> frobenius_component_scores([-2.0, 0.5]).tolist()
    [2.0, 0.5]
    """
    return np.abs(np.asarray(lam, "float32"))


def is_finite(*tensors):
    """Whether every entry of every tensor is finite, as a scalar tensor.

    A step with an overflowed gradient (e.g. under a loss scaler) would turn
    the smoothed scores into NaN for good; a caller keeps the old state with
    `ops.where(is_finite(grad), new, old)` instead of branching in Python.

    Args:
        *tensors: any number of tensors (or Keras Variables) of any shape.

    Returns:
        A scalar bool tensor; `True` when no tensor is given.

    Example:

    >>> import numpy as np
    >>> bool(ops.convert_to_numpy(is_finite(np.ones(3), np.array([np.nan]))))
    False
    """
    if not tensors:
        return ops.convert_to_tensor(True)
    # One check over all entries: a few operations whatever the count.
    return ops.all(ops.isfinite(_flat(tensors)))


# The kinds -------------------------------------------------------------------


class AdapterView:
    """What a kind of score sees of one adapted layer.

    In the train step `a`, `lam`, `b` and `mask` are tensors (the mask the
    allocator last wrote); on the host they are NumPy arrays.

    Args:
        path: the layer's path.
        a, lam, b: the adapter's factors `A (d_in, r)`, `lam (r,)`,
            `B (r, d_out)`, or their variables (for `init`).
        mask: the rank mask `(r,)`, or None where not known.
        scale: the layer's `alpha / init_rank`.
        penalty_weight: its `orth_reg_weight`.
        penalty_form: its `orth_penalty` (`"norm"` or `"squared"`).
    """

    def __init__(
        self,
        path,
        a,
        lam,
        b,
        mask=None,
        scale=1.0,
        penalty_weight=0.0,
        penalty_form="squared",
    ):
        self.path = path
        self.a, self.lam, self.b = a, lam, b
        self.mask = mask
        self.scale = scale
        self.penalty_weight = penalty_weight
        self.penalty_form = penalty_form

    @property
    def factors(self):
        return (self.a, self.lam, self.b)


class StateSpec:
    """One state buffer of a kind of score, all zeros at first.

    Args:
        name: the variable's name.
        shape: its shape.
        like: a variable whose distribution layout the buffer takes (a
            buffer per sharded adapter variable), or None (replicated).
    """

    def __init__(self, name, shape, like=None):
        self.name = name
        self.shape = tuple(shape)
        self.like = like


class Importance:
    """A kind of importance score: subclass it for a score of your own.

    Subclasses set `name` and implement `init`, `update` and `scores` (see
    the module docstring). `needs_masks = True` makes the optimizer keep a
    copy of the rank masks for `update` (read as `layer.mask`);
    `needs_warmup = True` refuses a schedule without warm-up (a score that
    is zero until the adapters have moved).

    Args:
        beta1: smoothing factor of the first moving average.
        beta2: smoothing factor of the second (if the kind has one).
    """

    name = None
    needs_masks = False
    needs_warmup = False

    def __init__(self, beta1=0.85, beta2=0.85):
        validate_betas(beta1, beta2)
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)

    def init(self, layers):
        raise NotImplementedError

    def update(self, state, layers, grads):
        raise NotImplementedError

    def accepts(self, grads, new_state):
        """Whether the state `update` returned is kept: by default, when
        every gradient of the step is finite (a scalar bool tensor)."""
        return is_finite(*grads)

    def scores(self, state, layers, alive):
        raise NotImplementedError

    def get_config(self):
        return {"beta1": self.beta1, "beta2": self.beta2}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __eq__(self, other):
        return (
            type(self) is type(other)
            and self.get_config() == other.get_config()
        )

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))


class Sensitivity(Importance):
    """The paper's score: smoothed sensitivity `|theta * grad|` times its
    uncertainty, per entry; a component scores its `lam` entry plus the
    means of its `A` column and `B` row (SPEC.md section 3).

    The state is one flat pair of buffers `I_bar`, `U_bar` over every
    adapter entry: the update is then a dozen fused operations per step
    instead of a dozen per variable (op dispatch dominates on eager torch
    and XLA CPU). When a `keras.distribution` shards some adapter variable,
    each variable gets its own pair, laid out like it, so that scores stay
    next to their parameters.
    """

    name = "sensitivity"

    def init(self, layers):
        variables = [v for layer in layers for v in layer.factors]
        if any(_distribution.is_sharded(v) for v in variables):
            return [
                StateSpec(
                    v.path.replace("/", "_") + "_" + name, v.shape, like=v
                )
                for v in variables
                for name in ("ipt_bar", "unc_bar")
            ]
        size = sum(_size(v.shape) for v in variables)
        return [StateSpec("ipt_bar", (size,)), StateSpec("unc_bar", (size,))]

    def update(self, state, layers, grads):
        thetas, gradients = [], []
        for layer, layer_grads in zip(layers, grads):
            thetas.extend(layer.factors)
            gradients.extend(layer_grads)
        if len(state) == 2:  # one flat pair
            pairs = [(_flat(thetas), _flat(gradients), state[0], state[1])]
        else:  # a pair per variable
            pairs = [
                (theta, grad, state[2 * i], state[2 * i + 1])
                for i, (theta, grad) in enumerate(zip(thetas, gradients))
            ]
        new = []
        for theta, grad, ipt, unc in pairs:
            new.extend(
                sensitivity_update(
                    theta, grad, ipt, unc, self.beta1, self.beta2
                )
            )
        return new

    def accepts(self, grads, new_state):
        # `|theta * grad|` carries any infinite or NaN gradient into the new
        # state: checking the state, a few buffers, checks the gradients.
        return is_finite(*new_state)

    def scores(self, state, layers, alive):
        shapes = [tuple(f.shape) for layer in layers for f in layer.factors]
        if len(state) == 2:
            flat = element_score(state[0], state[1]).reshape(-1)
            entries, offset = [], 0
            for shape in shapes:
                entries.append(
                    flat[offset : offset + _size(shape)].reshape(shape)
                )
                offset += _size(shape)
        else:
            entries = [
                element_score(state[2 * i], state[2 * i + 1]).reshape(shape)
                for i, shape in enumerate(shapes)
            ]
        components = [
            component_scores(*entries[3 * i : 3 * i + 3])
            for i in range(len(layers))
        ]
        totals = [
            float(c[np.asarray(m, bool)].sum())
            for c, m in zip(components, alive)
        ]
        return components, totals


class Frobenius(Importance):
    """The design note's score: one smoothed `||delta_W||_F` per layer, of
    the update the layer adds (scale and rank mask included), which decides
    how much rank a layer keeps; inside a layer the components with the
    largest `|lam|` stay. Zero until `lam` moves, so it needs a warm-up.
    `beta2` is unused.
    """

    name = "frobenius"
    needs_masks = True
    needs_warmup = True

    def init(self, layers):
        return [StateSpec("frobenius", (len(layers),))]

    def update(self, state, layers, grads):
        norms = ops.stack(
            [
                layer.scale
                * delta_frobenius_norm(
                    layer.a, _float32(layer.lam) * layer.mask, layer.b
                )
                for layer in layers
            ]
        )
        return [frobenius_update(norms, state[0], self.beta1)]

    def scores(self, state, layers, alive):
        components = [frobenius_component_scores(layer.lam) for layer in layers]
        return components, [float(v) for v in np.asarray(state[0]).reshape(-1)]


KINDS = {kind.name: kind for kind in (Sensitivity, Frobenius)}


def get(importance, beta1=0.85, beta2=0.85):
    """An `Importance` from a name (`"sensitivity"`, `"frobenius"`, with
    these betas) or an `Importance` instance (returned as it is).

    Raises:
        ValueError: naming the argument, for anything else.
    """
    if isinstance(importance, Importance):
        return importance
    if isinstance(importance, str) and importance in KINDS:
        return KINDS[importance](beta1, beta2)
    raise ValueError(
        f"`importance` must be one of {tuple(KINDS)} or an "
        "`keras_adalora.importance.Importance` instance. Received: "
        f"importance={importance!r}"
    )


def delta_frobenius_norm(a, lam, b):
    """`||A diag(lam) B||_F` from r x r Gram matrices, never forming the
    d_in x d_out product: `sum_ij lam_i lam_j (A^T A)_ij (B B^T)_ij`."""
    a, b, lam = _float32(a), _float32(b), _float32(lam)
    gram = ops.matmul(ops.transpose(a), a) * ops.matmul(b, ops.transpose(b))
    squared = ops.sum(gram * ops.expand_dims(lam, 0) * ops.expand_dims(lam, 1))
    return ops.sqrt(ops.maximum(squared, 0.0))


def _size(shape):
    size = 1
    for dim in shape:
        size *= int(dim)
    return size


def _flat(tensors):
    return ops.concatenate(
        [
            _float32(t) if len(t.shape) == 1 else ops.reshape(_float32(t), (-1,))
            for t in tensors
        ]
    )
