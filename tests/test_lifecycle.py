"""What a user trains survives the Keras workflows around `fit`.

Each test is a user's workflow on the current backend (the suite runs once
per backend): compile, `fit` with `RankBudgetCallback`, then checkpoints,
merging, saving, several fits, `EarlyStopping`, or adapting a model that
was already trained. Files are reloaded in fresh processes, whose modules
are checked (a merged model must load without keras_adalora).
"""

import keras
import numpy as np
import pytest
from helpers import data
from helpers import fresh_process
from helpers import mlp
from helpers import randomize_adapters
from helpers import to_numpy

import keras_adalora
from keras_adalora import AdaLoRAOptimizer
from keras_adalora import RankAllocator
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora.targets import adapted_layers


def masks_of(model):
    return {layer.path: to_numpy(layer.rank_mask).copy() for layer in adapted_layers(model)}


class MaskLog(keras.callbacks.Callback):
    """Records every adapted layer's mask and the logged rank after each
    batch."""

    def __init__(self):
        super().__init__()
        self.masks, self.rank, self.budget = [], [], []

    def on_train_batch_end(self, batch, logs=None):
        self.masks.append(masks_of(self.model))
        self.rank.append(logs["adalora_rank"])
        self.budget.append(logs["adalora_budget"])


def adapted_mlp(init_rank=4, **kwargs):
    model = mlp()
    apply_adalora(model, init_rank=init_rank, keep_trainable=["head"], **kwargs)
    return model


def compiled(model, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
    )
    return model


FIT = dict(batch_size=8, verbose=0)  # 64 samples: 8 steps per epoch


# 1. A merged model is a plain Keras model --------------------------------------


def test_a_fitted_compacted_merged_model_loads_without_keras_adalora(tmp_path):
    x, y = data(64)
    model = compiled(adapted_mlp())
    callback = RankBudgetCallback(target_rank=2, tinit=4, tfinal=20, delta_t=2)
    model.fit(x, y, epochs=4, callbacks=[callback], **FIT)
    compact_adalora(model)
    merge_adalora(model)
    # The optimizer the user compiled with, without the AdaLoRA wrapper or
    # its state; the merged model is frozen (a deployment artifact).
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert not isinstance(model.optimizer, AdaLoRAOptimizer)
    assert not model.optimizer.built and model.trainable_weights == []
    merged = tmp_path / "merged.keras"
    model.save(merged)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", to_numpy(model.predict(x, verbose=0)))

    plain = compiled(mlp())
    plain.fit(x, y, epochs=1, **FIT)
    plain.save(tmp_path / "plain.keras")
    assert merged.stat().st_size <= (tmp_path / "plain.keras").stat().st_size

    got = fresh_process(
        f"""
        with warnings.catch_warnings(record=True) as caught:
            import keras
            model = keras.saving.load_model({str(merged)!r})
            out = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        report(
            warnings=[str(w.message) for w in caught],
            gap=float(np.abs(out - np.load({str(tmp_path / "want.npy")!r})).max()),
            optimizer=type(model.optimizer).__name__,
            layers=sorted({{type(layer).__name__ for layer in model.layers}}),
        )
        """
    )
    assert not got["keras_adalora_imported"]
    assert got["warnings"] == []
    assert got["gap"] < 1e-6
    assert got["optimizer"] == "Adam"
    assert got["layers"] == ["Dense", "InputLayer"]


def test_a_merged_keras_hub_model_loads_as_any_keras_hub_model(tmp_path):
    pytest.importorskip("keras_hub")
    import hub_models
    x, y, _ = hub_models.batch("bert")
    untouched = hub_models.bert()
    untouched.save(tmp_path / "untouched.keras")  # never saw keras_adalora

    model = hub_models.bert()
    apply_adalora(model, init_rank=4, target=["all", "position_embeddings"])
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=2)
    model.fit(x, y, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
    compact_adalora(model)
    merge_adalora(model)
    merged = tmp_path / "merged.keras"
    model.save(merged)
    np.savez(tmp_path / "x.npz", **x)
    np.save(tmp_path / "want.npy", to_numpy(model.predict(x, verbose=0)))
    plain = hub_models.bert()
    plain.compile(optimizer=keras.optimizers.AdamW(1e-2))
    plain.fit(x, y, batch_size=4, epochs=1, verbose=0)
    plain.save(tmp_path / "plain.keras")
    assert merged.stat().st_size <= (tmp_path / "plain.keras").stat().st_size

    got = fresh_process(
        f"""
        import keras
        import keras_hub
        def load(name, compile):
            with warnings.catch_warnings(record=True) as caught:
                model = keras.saving.load_model({str(tmp_path)!r} + "/" + name, compile=compile)
            return model, sorted({{str(w.message)[:40] for w in caught}})
        x = dict(np.load({str(tmp_path / "x.npz")!r}))
        model, for_inference = load("merged.keras", compile=False)
        _, compiled = load("merged.keras", compile=True)
        _, untouched = load("untouched.keras", compile=True)
        out = model.predict(x, verbose=0)
        report(
            for_inference=for_inference,
            compiled=compiled,
            untouched=untouched,
            cls=type(model).__name__,
            gap=float(np.abs(out - np.load({str(tmp_path / "want.npy")!r})).max()),
        )
        """
    )
    assert not got["keras_adalora_imported"]
    assert got["cls"] == "BertTextClassifier"
    assert got["for_inference"] == []
    # Keras's note that KerasHub tasks override `compile`, for every
    # KerasHub file; nothing about the optimizer.
    assert got["compiled"] == got["untouched"]
    assert all("compile()` was not called" in w for w in got["compiled"])
    assert got["gap"] < 1e-5


# 2. `.keras` files of adapted KerasHub models ----------------------------------


def test_keras_hub_models_reload_adapted_trained_and_compacted(tmp_path):
    pytest.importorskip("keras_hub")
    import hub_models
    expected = {}
    for family in sorted(hub_models.FAMILIES):
        model = hub_models.FAMILIES[family][0]()
        # BERT's and GPT-2's learned positions too (a KerasHub layer that a
        # process importing keras_adalora before keras_hub must still load).
        learned = family in ("bert", "gpt2")
        target = ["all"] + (["position_embeddings"] if learned else [])
        apply_adalora(model, init_rank=4, target=target)
        x, y, sample_weight = hub_models.batch(family)
        model.compile(
            optimizer=keras.optimizers.Adam(1e-2),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )
        callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=2)
        model.fit(
            x, y, sample_weight=sample_weight, batch_size=4, epochs=2,
            callbacks=[callback], verbose=0,
        )
        if family in ("gpt2", "llama"):
            compact_adalora(model)  # reloads compacted
        model.save(tmp_path / f"{family}.keras")
        np.savez(tmp_path / f"{family}_x.npz", **x)
        np.save(tmp_path / f"{family}_out.npy", to_numpy(model.predict(x, verbose=0)))
        expected[family] = {
            "pattern": get_rank_pattern(model),
            "stored": {k: v.shape[0] for k, v in masks_of(model).items()},
            "trainable": sorted(v.path for v in model.trainable_weights),
            "iterations": int(to_numpy(model.optimizer.iterations)),
            "schedule": model.optimizer.read_schedule(),
        }

    got = fresh_process(
        f"""
        import keras
        import keras_adalora
        from keras_adalora.targets import adapted_layers
        results = {{}}
        for family in {sorted(hub_models.FAMILIES)!r}:
            base = {str(tmp_path)!r} + "/" + family
            with warnings.catch_warnings(record=True) as caught:
                model = keras.saving.load_model(base + ".keras")
            out = model.predict(dict(np.load(base + "_x.npz")), verbose=0)
            results[family] = {{
                "warnings": [str(w.message) for w in caught],
                "gap": float(np.abs(out - np.load(base + "_out.npy")).max()),
                "pattern": keras_adalora.get_rank_pattern(model),
                "stored": {{l.path: int(l.adapter_rank) for l in adapted_layers(model)}},
                "trainable": sorted(v.path for v in model.trainable_weights),
                "optimizer": type(model.optimizer).__name__,
                "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
                "schedule": model.optimizer.read_schedule(),
            }}
        report(results=results)
        """
    )
    assert got["keras_adalora_imported"]
    for family, want in expected.items():
        result = got["results"][family]
        assert result["warnings"] == [], family
        # The same weights: the same outputs, to float32 round-off.
        assert result["gap"] <= 1e-6, family
        assert result["pattern"] == want["pattern"], family
        assert ("position_embedding" in want["pattern"]) == (
            family in ("bert", "gpt2")
        ), family
        assert result["stored"] == want["stored"], family
        assert result["trainable"] == want["trainable"], family
        assert result["optimizer"] == "AdaLoRAOptimizer", family
        assert result["iterations"] == want["iterations"], family
        assert result["schedule"] == want["schedule"], family


def test_a_checkpoint_reloads_in_a_fresh_process_trains_on_merges_and_deploys(
    tmp_path,
):
    """The whole workflow on a classifier that takes raw text (its
    preprocessor is part of the model): fit with the callback and
    ModelCheckpoint, load the best checkpoint in a new process, fit on (the
    schedule continues), compact, merge, save, and load the merged file
    where keras_adalora is not."""
    pytest.importorskip("keras_hub")
    import hub_models
    x, y = hub_models.texts(n=16)
    model = hub_models.bert_with_preprocessor()
    apply_adalora(model, init_rank=4, target="all")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    checkpoint = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "best.keras"), monitor="loss", save_best_only=True
    )
    schedule = dict(target_rank=1, tinit=0.1, tfinal=0.7, delta_t=2)
    log = MaskLog()
    # 4 steps per epoch, 8 in this fit: the schedule spans both fits.
    model.fit(
        x, y, batch_size=4, epochs=2, verbose=0,
        callbacks=[RankBudgetCallback(total_steps=16, **schedule), checkpoint, log],
    )
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)

    got = fresh_process(
        f"""
        import keras
        import keras_adalora
        from helpers import to_numpy
        folder = {str(tmp_path)!r}
        x, y = np.load(folder + "/x.npy"), np.load(folder + "/y.npy")
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model(folder + "/best.keras")
        start = int(to_numpy(model.optimizer.iterations))
        stored = model.optimizer.read_schedule()
        callback = keras_adalora.RankBudgetCallback(total_steps=16, **{schedule!r})
        history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback])
        pattern = keras_adalora.get_rank_pattern(model)
        keras_adalora.compact_adalora(model)
        keras_adalora.merge_adalora(model)
        model.save(folder + "/merged.keras")
        np.save(folder + "/merged_out.npy", to_numpy(model.predict(x, verbose=0)))
        report(
            warnings=[str(w.message) for w in caught],
            start=start,
            stored=stored,
            ranks=history.history["adalora_rank"],
            budget=callback.target_budget,
            pattern_total=sum(pattern.values()),
        )
        """
    )
    assert got["keras_adalora_imported"]
    assert got["warnings"] == []
    assert got["start"] in (4, 8)  # the best epoch's step
    assert got["stored"] == model.optimizer.read_schedule()
    assert got["stored"]["total_steps"] == 16
    assert got["ranks"][-1] == got["budget"] == got["pattern_total"] == 12
    assert max(got["ranks"]) <= log.rank[got["start"] - 1]

    deployed = fresh_process(
        f"""
        import keras
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model({str(tmp_path / "merged.keras")!r}, compile=False)
        out = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        report(
            warnings=[str(w.message) for w in caught],
            gap=float(np.abs(out - np.load({str(tmp_path / "merged_out.npy")!r})).max()),
        )
        """
    )
    assert not deployed["keras_adalora_imported"]
    assert deployed["warnings"] == []
    assert deployed["gap"] < 1e-5


def test_a_subclassed_model_with_sublayers_built_in_code_reloads(tmp_path):
    # Its config lists no layers: they come back plain and are adapted again.
    from test_apply import tiny_transformer

    model = tiny_transformer()
    apply_adalora(model, init_rank=2, target="all", dropout=0.1)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5, 8)).astype("float32")
    y = rng.integers(0, 2, size=(16,))
    compiled(model)
    model.fit(x, y, epochs=2, callbacks=[RankBudgetCallback(target_rank=1, tinit=1, tfinal=3, delta_t=1)], **FIT)
    model.save(tmp_path / "tiny.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "out.npy", to_numpy(model.predict(x, verbose=0)))
    got = fresh_process(
        f"""
        import keras
        import keras_adalora
        import test_apply  # registers TinyTransformerBlock
        model = keras.saving.load_model({str(tmp_path / "tiny.keras")!r})
        out = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        report(
            pattern=keras_adalora.get_rank_pattern(model),
            gap=float(np.abs(out - np.load({str(tmp_path / "out.npy")!r})).max()),
            trainable=len(model.trainable_weights),
        )
        """
    )
    assert got["pattern"] == get_rank_pattern(model)
    assert got["gap"] == 0.0
    assert got["trainable"] == len(model.trainable_weights)


# 3. One schedule across several `fit` calls ------------------------------------


def two_layer_model():
    model = mlp()
    apply_adalora(model, init_rank=4, target=["hidden"], keep_trainable=["head"])
    return compiled(model)


def test_a_schedule_frozen_in_one_fit_stays_frozen_in_the_next():
    x, y = data(64)
    model = two_layer_model()
    # Fractions of this first fit: pruning from step 1 to 6 of 8.
    model.fit(x, y, epochs=1, callbacks=[RankBudgetCallback(target_rank=1, delta_t=2)], **FIT)
    frozen = masks_of(model)
    assert sum(m.sum() for m in frozen.values()) == 2
    log = MaskLog()
    model.fit(x, y, epochs=2, callbacks=[RankBudgetCallback(target_rank=1, delta_t=2), log], **FIT)
    assert len(log.masks) == 16
    for masks in log.masks:
        for path, mask in masks.items():
            np.testing.assert_array_equal(mask, frozen[path])
    assert log.rank == [2] * 16 and log.budget == [2] * 16
    assert model.optimizer.scoring is False


def test_a_later_fit_asking_for_another_schedule_is_refused_before_training():
    x, y = data(64)
    model = two_layer_model()
    model.fit(x, y, epochs=1, callbacks=[RankBudgetCallback(target_rank=1, delta_t=2)], **FIT)
    weights = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match="schedule was fixed when its AdaLoRA training started"):
        model.fit(
            x, y, epochs=1, **FIT,
            callbacks=[RankBudgetCallback(target_rank=1, tinit=2, tfinal=5, delta_t=1)],
        )
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, to_numpy(after))
    # Compiling again starts a new schedule on what is alive.
    compiled(model)
    log = MaskLog()
    model.fit(
        x, y, epochs=1, **FIT,
        callbacks=[RankBudgetCallback(target_rank=1, tinit=2, tfinal=5, delta_t=1), log],
    )
    assert log.rank[-1] == 2


# 4. Adapting a model that was already trained ----------------------------------


def test_adapting_a_trained_model_runs_the_three_phases_from_there():
    x, y = data(64)
    model = compiled(mlp())
    model.fit(x, y, epochs=5, **FIT)  # 40 plain steps
    apply_adalora(model, init_rank=4, keep_trainable=["head"])
    trained = MaskLog()
    schedule = dict(target_rank=1, tinit=0.1, tfinal=0.7, delta_t=2)
    model.fit(x, y, epochs=5, callbacks=[RankBudgetCallback(**schedule), trained], **FIT)
    assert int(to_numpy(model.optimizer.iterations)) == 80

    fresh_model = compiled(adapted_mlp())
    fresh = MaskLog()
    fresh_model.fit(x, y, epochs=5, callbacks=[RankBudgetCallback(**schedule), fresh], **FIT)
    # Warm-up (4 steps at 8 components), pruning, then frozen at 2, as on a
    # freshly adapted model.
    assert trained.budget == fresh.budget
    assert trained.budget[:4] == [8] * 4 and trained.budget[27:] == [2] * 13
    assert trained.rank[:4] == [8] * 4 and trained.rank[-1] == 2


# 5. EarlyStopping(restore_best_weights=True) -----------------------------------


class EpochScore(keras.callbacks.Callback):
    """Logs `epoch_score` = the epoch, so that epoch 0 is the best (mode
    "min"), and keeps the weights of epoch 0's end."""

    def on_epoch_end(self, epoch, logs=None):
        logs["epoch_score"] = float(epoch)
        if epoch == 0:
            self.snapshot = [to_numpy(w).copy() for w in self.model.weights]


@pytest.mark.parametrize("early_stopping_first", [False, True])
def test_early_stopping_restores_weights_but_keeps_the_final_ranks(early_stopping_first):
    x, y = data(64)
    model = compiled(adapted_mlp())
    budget = RankBudgetCallback(target_rank=1, tinit=4, tfinal=20, delta_t=2)
    score = EpochScore()
    stopping = keras.callbacks.EarlyStopping(
        monitor="epoch_score", mode="min", patience=10, restore_best_weights=True
    )
    callbacks = [score, stopping, budget] if early_stopping_first else [budget, score, stopping]
    with pytest.warns(UserWarning, match="EarlyStopping"):
        history = model.fit(x, y, epochs=4, callbacks=callbacks, **FIT)
    assert history.history["adalora_rank"][-1] == budget.target_budget == 2
    assert sum(get_rank_pattern(model).values()) == 2
    # The other weights are the restored snapshot's (epoch 0, while pruning).
    for variable, value in zip(model.weights, score.snapshot):
        if variable.name != "rank_mask":
            np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)


# 6. A layer with no gradient ----------------------------------------------------


def test_an_output_in_no_loss_loses_its_rank_on_every_backend():
    inputs = keras.Input((12,))
    # The unused branch comes first, so that ties (all scores zero, as when
    # no layer was scored) would keep it.
    unused = keras.layers.Dense(16, activation="tanh", name="a_unused")(inputs)
    unused = keras.layers.Dense(1, name="out_unused")(unused)
    used = keras.layers.Dense(16, activation="tanh", name="b_used")(inputs)
    used = keras.layers.Dense(1, name="out_used")(used)
    model = keras.Model(inputs, {"out_used": used, "out_unused": unused})
    apply_adalora(model, init_rank=4, target=["a_unused", "b_used"], keep_trainable=["out_"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss={"out_used": "mse"})
    x, _ = data(64, input_dim=12)
    y = {"out_used": np.sin(x[:, :1] * 2.0)}
    callback = RankBudgetCallback(target_rank=2, tinit=4, tfinal=20, delta_t=2)
    model.fit(x, y, epochs=4, callbacks=[callback], **FIT)
    assert get_rank_pattern(model) == {"a_unused": 0, "b_used": 4}


# 7. and 8. Frobenius scores; pruned components stay pruned -----------------------


def test_the_frobenius_score_is_the_norm_of_what_each_layer_adds():
    model = mlp()
    apply_adalora(model, init_rank=4, target=["hidden"])  # 16x32 and 32x32
    rng = np.random.default_rng(0)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign(rng.normal(size=4).astype("float32") * 3)
        layer.rank_mask.assign(np.array([1, 0, 1, 0], "float32"))
    optimizer = AdaLoRAOptimizer(keras.optimizers.SGD(0.0), beta1=0.0, importance="frobenius")
    optimizer.build(model.trainable_variables)
    allocator = RankAllocator(model, optimizer, target_rank=1, tinit=1, tfinal=3, total_steps=4)
    variables = model.trainable_variables
    optimizer.apply([keras.ops.zeros(v.shape) for v in variables], variables)
    _, layer_scores = optimizer.scores_on_host(allocator.paths)
    want = [float(np.linalg.norm(to_numpy(layer.delta_matrix()))) for layer in adapted_layers(model)]
    np.testing.assert_allclose(layer_scores, want, rtol=1e-5)
    assert want[0] != pytest.approx(want[1])  # different scales per layer


class StaleSingularValues(keras.callbacks.Callback):
    """After each batch, gives every pruned component a large `lam`: stale
    values must not bring it back."""

    def on_train_batch_end(self, batch, logs=None):
        for layer in adapted_layers(self.model):
            lam = to_numpy(layer.adalora_lam)
            mask = to_numpy(layer.rank_mask)
            layer.adalora_lam.assign(np.where(mask > 0.5, lam, 100.0).astype("float32"))


class StaleScores(keras.callbacks.Callback):
    """Gives every pruned component the top score at each mask update (as
    stale sensitivity buffers could), so that a pruned component would win
    the next ranking if it were a candidate again."""

    def on_train_begin(self, logs=None):
        optimizer = self.model.optimizer
        original = optimizer.scores_on_host
        layers = {layer.path: layer for layer in adapted_layers(self.model)}

        def inflated(paths, alive=None):
            components, totals = original(paths, alive)
            out = []
            for path, scores in zip(paths, components):
                mask = to_numpy(layers[path].rank_mask)
                out.append(np.where(mask > 0.5, scores, 1e9))
            return out, totals

        optimizer.scores_on_host = inflated


@pytest.mark.parametrize(
    "importance, allocation",
    [("sensitivity", "global"), ("sensitivity", "layer"), ("frobenius", "global"),
     ("frobenius", "layer")],
)
def test_a_pruned_component_never_comes_back(importance, allocation):
    x, y = data(64)
    model = compiled(adapted_mlp())
    log = MaskLog()
    callback = RankBudgetCallback(
        target_rank=1, tinit=2, tfinal=28, delta_t=1,
        importance=importance, allocation=allocation,
    )
    stale = [StaleSingularValues(), StaleScores()]
    model.fit(x, y, epochs=4, callbacks=[callback, *stale, log], **FIT)
    for before, after in zip(log.masks, log.masks[1:]):
        for path in before:
            assert np.all(after[path] <= before[path]), path
    assert log.rank[-1] == 2 and sum(get_rank_pattern(model).values()) == 2


# 9. Smaller traps ---------------------------------------------------------------


def test_a_callback_init_rank_below_the_adapters_rank_is_refused():
    x, y = data(64)
    model = compiled(adapted_mlp(init_rank=8))
    weights = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match="`init_rank`=4 is below the rank the adapters hold"):
        model.fit(x, y, epochs=1, callbacks=[RankBudgetCallback(target_rank=2, init_rank=4)], **FIT)
    for before, after in zip(weights, model.weights):
        np.testing.assert_array_equal(before, to_numpy(after))


def test_a_merged_model_is_said_to_be_merged(tmp_path):
    x, y = data(64)
    model = compiled(adapted_mlp())
    merge_adalora(model)
    for call in (
        lambda: model.fit(x, y, callbacks=[RankBudgetCallback(target_rank=1)], **FIT),
        lambda: keras_adalora.summary(model),
        lambda: keras_adalora.save_adapter(model, tmp_path / "a.adalora.h5"),
        lambda: keras_adalora.plot_rank_allocation(model),
        lambda: compact_adalora(model),
    ):
        with pytest.raises(ValueError, match="it was merged with `merge_adalora`"):
            call()


def test_plot_rank_allocation_on_a_plain_model_names_itself():
    pytest.importorskip("matplotlib")
    with pytest.raises(ValueError, match="`plot_rank_allocation` found no AdaLoRA layer"):
        keras_adalora.plot_rank_allocation(mlp())


def test_adapting_every_dense_layer_keeps_a_small_head_trainable():
    x, y = data(64)
    model = mlp(outputs=3)  # head 32 x 3: cannot hold rank 12
    apply_adalora(model)
    assert list(get_rank_pattern(model)) == ["hidden", "hidden_2"]
    head = model.get_layer("head")
    assert type(head) is keras.layers.Dense
    assert {v.path for v in head.trainable_weights} == {"head/kernel", "head/bias"}
    compiled(model).fit(x, y, epochs=1, callbacks=[RankBudgetCallback(target_rank=4, tinit=1, tfinal=4)], **FIT)
    assert sum(get_rank_pattern(model).values()) == 8


def test_a_callable_target_is_only_asked_about_layers_it_could_adapt():
    pytest.importorskip("keras_hub")
    import hub_models
    seen = []

    def target(layer):
        seen.append(layer)
        return "transformer_layer" in layer.path  # path is never None here

    model = apply_adalora(hub_models.bert(), init_rank=2, target=target)
    assert len(get_rank_pattern(model)) == 12
    kinds = (
        keras.layers.Dense,
        keras.layers.EinsumDense,
        keras.layers.Embedding,
        hub_models.keras_hub.layers.PositionEmbedding,
    )
    assert seen and all(isinstance(layer, kinds) for layer in seen)
    assert any(type(layer) is kinds[-1] for layer in seen)  # BERT's positions


def test_rebuilding_the_optimizer_keeps_weight_decay_exclusions_and_state():
    x, y = data(64)
    model = adapted_mlp()
    optimizer = keras.optimizers.AdamW(1e-2, weight_decay=0.5, use_ema=True)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    compiled(model, optimizer)
    model.fit(x, y, epochs=2, callbacks=[RankBudgetCallback(target_rank=1, tinit=2, tfinal=10, delta_t=2)], **FIT)
    before = {v.name: to_numpy(v).copy() for v in model.optimizer.variables}
    iterations = int(to_numpy(model.optimizer.iterations))
    compact_adalora(model)  # rebuilds the optimizer for the smaller adapters
    after = {v.name: to_numpy(v) for v in model.optimizer.variables}
    head = [name for name in after if name.startswith("head_")]
    assert {n.rsplit("_", 1)[-1] for n in head} >= {"momentum", "velocity", "average"}
    for name in head:  # the head's moments and EMA average carry over
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert int(to_numpy(model.optimizer.iterations)) == iterations
    inner = model.optimizer.inner_optimizer
    assert inner.use_ema
    bias = model.get_layer("head").bias
    assert not inner._use_weight_decay(bias)
    assert inner._use_weight_decay(model.get_layer("head").kernel)


def test_reading_adapters_and_schedules_raises_no_numpy_deprecation_warning(tmp_path):
    # NumPy 2 warns when a Keras variable is converted directly (JAX). Keras's
    # own optimizer `get_config` still does, so the compacting and merging
    # here run on a model that was never compiled.
    import warnings

    model = apply_adalora(mlp(), init_rank=4, keep_trainable=["head"])
    model.compile(optimizer="adam",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[RankBudgetCallback(target_rank=2, tinit=1, tfinal=6)])
        pattern = get_rank_pattern(model)
        keras_adalora.summary(model, print_fn=lambda *args, **kwargs: None)
        path = str(tmp_path / "a.adalora.h5")
        keras_adalora.save_adapter(model, path)
        fresh = randomize_adapters(apply_adalora(mlp(), init_rank=4, keep_trainable=["head"]))
        for layer in adapted_layers(fresh):
            layer.rank_mask.assign(np.array([1.0, 0.0, 1.0, 0.0], "float32"))
        compact_adalora(fresh)
        merge_adalora(fresh)
    assert sum(pattern.values()) == 4
