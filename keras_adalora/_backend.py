"""The few places where keras-adalora touches backend or trainer internals."""

import keras

from keras_adalora import _distribution
from keras_adalora import _keras


def refresh_tracked_parameters(model):
    """Re-registers variables with torch after layers gained or lost some.

    A torch-backed Keras layer snapshots its (and its sublayers') variables
    into a `torch.nn.ParameterDict` when built. After adapting, compacting or
    merging layers in place, those snapshots would still hold the old
    variables: `model.parameters()` would miss the adapter (a torch training
    loop would not train it) and keep removed tensors alive. No-op on the
    other backends.
    """
    if keras.backend.backend() != "torch":
        return
    for layer in _keras.sublayers(model, include_self=True):
        _keras.refresh_torch_parameters(layer)


def reset_compiled_state(model, optimizer=None):
    """Keeps a compiled model trainable after its variables changed.

    The traced train/test/predict functions and a built optimizer refer to
    the variables the model had. The functions are dropped (Keras retraces
    them). A built optimizer is replaced by a copy of itself built for the
    current trainable variables: same configuration (with any
    `exclude_from_weight_decay` settings), and the state of everything that
    survived carried over by name and shape: the step counter (`iterations`,
    which schedules count from), the moments and EMA averages of variables
    that are still trained (a task head), the AdaLoRA schedule. The state of
    variables that changed shape (compacted adapters) restarts from zero. A
    `.keras` file saved afterwards reloads.

    Args:
        model: the model whose variables changed.
        optimizer: the optimizer to install instead of the model's own, as
            is (`merge_adalora` passes the unwrapped, reset one); `None`
            rebuilds the model's optimizer as described above.
    """
    # `predict` traces and keeps its function on an uncompiled model too.
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    if not getattr(model, "compiled", False):
        return
    old = getattr(model, "optimizer", None)
    if optimizer is not None:
        _install(model, old, optimizer)
    elif old is not None and old.built:
        with _distribution.optimizer_scope(model):
            fresh = old.__class__.from_config(old.get_config())
            _copy_settings(old, fresh)
            fresh.build(model.trainable_variables)
        _copy_state(old, fresh)
        _install(model, old, fresh)
    _keras.record_trainable_state(model)


def unwrapped_optimizer(optimizer):
    """A fresh, unbuilt copy of `optimizer` without its AdaLoRA wrapper.

    What a merged model keeps: the optimizer the user compiled with (inside
    its `LossScaleOptimizer`, if any), with the same configuration and
    weight-decay exclusions by name, and no state, as after `compile`.
    """
    from keras_adalora.optimizer import AdaLoRAOptimizer

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        inner = unwrapped_optimizer(optimizer.inner_optimizer)
        config = optimizer.get_config()
        config.pop("inner_optimizer")
        return optimizer.__class__(inner, **config)
    if isinstance(optimizer, AdaLoRAOptimizer):
        return unwrapped_optimizer(optimizer.inner_optimizer)
    fresh = optimizer.__class__.from_config(optimizer.get_config())
    _copy_settings(optimizer, fresh)
    return fresh


def set_compiled_optimizer(model, old, new):
    """Makes `new` the optimizer `model.save` records in place of `old`.

    `compile` keeps the optimizer it was given in the compile config, which
    `keras.saving.load_model` compiles the reloaded model with; under
    `mixed_float16` that is the one inside the automatic
    `LossScaleOptimizer`.
    """
    compile_config = _keras.compile_config(model)
    if compile_config is None:
        return
    recorded = compile_config.config.get("optimizer")
    if recorded is old:
        compile_config.config["optimizer"] = new
    elif (
        isinstance(old, keras.optimizers.LossScaleOptimizer)
        and isinstance(new, keras.optimizers.LossScaleOptimizer)
        and recorded is old.inner_optimizer
    ):
        compile_config.config["optimizer"] = new.inner_optimizer


def _install(model, old, new):
    model.optimizer = new
    set_compiled_optimizer(model, old, new)


def _copy_settings(old, fresh):
    """Settings an optimizer keeps outside its config, level by level of a
    wrapped chain: the weight-decay exclusion pattern and the AdaLoRA
    wrapper's scoring switch and watched layers (whose penalty the new
    wrapper takes over)."""
    for source, target in zip(_chain(old), _chain(fresh)):
        _keras.copy_weight_decay_pattern(source, target)
        if hasattr(source, "watched"):
            target.scoring = source.scoring
            target.take_over(source)


def _copy_state(old, fresh):
    """Copies every optimizer variable that exists in both, by name and
    shape (optimizer slots are named after the variable they track), level
    by level of a wrapped chain, and the variables excluded from weight
    decay by `var_list` (by path: compaction makes new variable objects)."""
    for source, target in zip(_chain(old), _chain(fresh)):
        excluded = _keras.weight_decay_exclusions(source)
        if excluded:
            paths = {
                v.path
                for v in _keras.optimizer_trainable_variables(source)
                if id(v) in excluded
            }
            _keras.set_weight_decay_exclusions(
                target,
                (
                    id(v)
                    for v in _keras.optimizer_trainable_variables(target)
                    if v.path in paths
                ),
            )
        saved = {}
        for variable in _own_variables(source):
            saved.setdefault(variable.name, []).append(variable)
        for variable in _own_variables(target):
            matches = [
                v
                for v in saved.get(variable.name, ())
                if tuple(v.shape) == tuple(variable.shape)
            ]
            if len(matches) == 1:
                variable.assign(matches[0])


def _own_variables(optimizer):
    """An optimizer's variables without those of the optimizer it wraps."""
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is None:
        return list(optimizer.variables)
    return list(_keras.optimizer_own_variables(optimizer))


def _chain(optimizer):
    """`optimizer` and the optimizers it wraps (`inner_optimizer`), outer
    first: a LossScaleOptimizer, an AdaLoRAOptimizer, the user's optimizer."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
