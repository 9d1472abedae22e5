"""The few places where keras-adalora touches backend or trainer internals."""

import keras

from keras_adalora import _distribution


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
    for layer in model._flatten_layers(include_self=True):
        if hasattr(layer, "_torch_params"):
            layer._track_variables()


def reset_compiled_state(model):
    """Keeps a compiled model trainable after its variables changed.

    The traced train/test/predict functions and a built optimizer refer to
    the variables the model had. The functions are dropped (Keras retraces
    them); a built optimizer is replaced by a fresh one of the same
    configuration, built for the current trainable variables, that continues
    its step counter (`iterations`, which schedules count from). Its moment
    estimates restart from zero. A `.keras` file saved afterwards reloads.
    """
    if not getattr(model, "compiled", False):
        return
    model.train_function = None
    model.test_function = None
    model.predict_function = None
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer.built:
        with _distribution.optimizer_scope(model):
            fresh = optimizer.__class__.from_config(optimizer.get_config())
            fresh.build(model.trainable_variables)
        _innermost(fresh)._iterations.assign(_innermost(optimizer)._iterations)
        old_scorer, new_scorer = _scorer(optimizer), _scorer(fresh)
        if old_scorer is not None:
            # The schedule's position survives; the scores restart.
            new_scorer.last_mask_step.assign(old_scorer.last_mask_step)
        model.optimizer = fresh
        if getattr(model, "_compile_config", None) is not None:
            model._compile_config.config["optimizer"] = fresh
    model._compiled_trainable_state = {
        layer: layer.trainable for layer in model._flatten_layers()
    }


def _chain(optimizer):
    """`optimizer` and the optimizers it wraps (`inner_optimizer`), outer
    first: a LossScaleOptimizer, an AdaLoRAOptimizer, the user's optimizer."""
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def _innermost(optimizer):
    """The optimizer that owns the step counter of a wrapped chain."""
    return list(_chain(optimizer))[-1]


def _scorer(optimizer):
    from keras_adalora.optimizer import AdaLoRAOptimizer

    return next(
        (o for o in _chain(optimizer) if isinstance(o, AdaLoRAOptimizer)), None
    )
