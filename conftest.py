"""Runs the docstring examples of `keras_adalora` as doctests, with the names
they use already imported (as in the Keras documentation)."""

import keras
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    import keras_adalora
    from keras_adalora import AdaLoRAOptimizer
    from keras_adalora import RankAllocator
    from keras_adalora import apply_adalora
    from keras_adalora import get_rank_pattern

    keras.utils.set_random_seed(0)
    try:
        import keras_hub
    except ImportError:  # an optional extra; its examples then fail loudly
        keras_hub = None
    doctest_namespace.update(
        keras_hub=keras_hub,
        np=np,
        keras=keras,
        ops=keras.ops,
        keras_adalora=keras_adalora,
        AdaLoRAOptimizer=AdaLoRAOptimizer,
        RankAllocator=RankAllocator,
        apply_adalora=apply_adalora,
        get_rank_pattern=get_rank_pattern,
    )
