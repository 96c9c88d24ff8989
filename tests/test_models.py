import numpy as np
import pytest

from fmnist.config import FAMILIES
from fmnist.data import load_splits
from fmnist.models import MODELS, build_model
from fmnist.train import ConfigError, TrainConfig, TrainingRun

CONFIGS = {
    "mlp": [dict(hidden_layers=1, units=16), dict(hidden_layers=5, units=8, batch_norm=True,
                                                 dropout=0.2)],
    "cnn": [dict(blocks=1, base_filters=4, kernel_size=5, dense_units=0),
            dict(blocks=4, base_filters=4, batch_norm=True, dense_units=8, augment_flip=True,
                 augment_translate=0.1)],
    "vgg": [dict(blocks=2, convs_per_block=1, base_filters=4, dense_units=8),
            dict(blocks=4, convs_per_block=(2, 2, 3, 3), base_filters=2, max_filters=8,
                 batch_norm=True, dense_units=8, dropout=0.3)],
    "resnet": [dict(stages=1, blocks_per_stage=1, base_filters=4),
               dict(stages=3, blocks_per_stage=2, base_filters=4, batch_norm=True)],
}


def test_every_family_has_configs():
    assert set(CONFIGS) == set(MODELS)
    assert tuple(MODELS) == FAMILIES  # the config's list of names matches the registry


@pytest.mark.parametrize(
    "family,overrides", [(f, o) for f, options in CONFIGS.items() for o in options]
)
def test_family_builds_and_trains_one_epoch(tiny_data_dir, family, overrides):
    data = load_splits(tiny_data_dir, val_size=100, train_size=200)
    cfg = TrainConfig(model=family, epochs=1, batch_size=32, **overrides)
    run = TrainingRun(cfg, data)
    assert run.model.output_shape == (None, 10)
    m = run.fit_epoch()
    assert m["epoch"] == 1 and np.isfinite(m["loss"]) and 0 <= m["val_accuracy"] <= 1
    probs = run.model.predict(data.x_val[:5], verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_custom_vgg_of_notebook_000():
    cfg = TrainConfig(model="vgg", blocks=4, convs_per_block=[2, 2, 3, 3], base_filters=32,
                      max_filters=256, dense_units=256, dropout=0.3)
    model = build_model(cfg)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 64, 64, 128, 128, 128, 256, 256, 256]
    assert model.get_layer("dense").units == 256
    assert model.get_layer("dense_dropout").rate == 0.3


def test_resnet10_has_ten_weight_layers():
    model = build_model(TrainConfig(model="resnet", stages=4, blocks_per_stage=1))
    names = [layer.name for layer in model.layers]
    convs = [n for n in names if n.endswith("_conv") and "proj" not in n]
    dense = [n for n in names if n == "classes"]
    assert len(convs) + len(dense) == 10


def test_normalization_keeps_one_channel():
    model = build_model(TrainConfig(model="cnn"))
    assert model.get_layer("normalize").output.shape == (None, 28, 28, 1)
    x = np.full((1, 28, 28), 72.94, dtype=np.float32).astype(np.uint8)
    sub = model.get_layer("normalize")
    out = np.asarray(sub(model.get_layer("add_channel")(x)))
    assert abs(float(out.mean())) < 0.02  # the train mean maps to ~0


def _first_mask(layer, shape):
    return np.asarray(layer(np.ones(shape, "float32"), training=True)) != 0


def test_dropout_layers_draw_their_own_masks():
    # Keras layers given one seed draw the same numbers: these dropped the same units.
    cfg = TrainConfig(model="mlp", hidden_layers=3, units=64, dropout=0.5, seed=3)
    layers = [build_model(cfg).get_layer(f"hidden{i}_dropout") for i in range(3)]
    masks = [_first_mask(layer, (8, 64)) for layer in layers]
    assert all(0.3 < m.mean() < 0.7 for m in masks)
    assert not np.array_equal(masks[0], masks[1])
    assert not np.array_equal(masks[1], masks[2])
    # Masks of other shapes do not share their leading draws either (cnn's block dropouts).
    cnn = build_model(TrainConfig(model="cnn", blocks=2, dropout=0.5, dense_units=16))
    a = _first_mask(cnn.get_layer("block0_dropout"), (512,)).ravel()
    b = _first_mask(cnn.get_layer("block1_dropout"), (1024,)).ravel()
    assert (a == b[:512]).mean() < 0.9  # independent: about 0.6 agree at rate 0.25
    # Still one run per seed: the same config draws the same mask, another seed another.
    again = build_model(cfg).get_layer("hidden0_dropout")
    assert np.array_equal(_first_mask(again, (8, 64)), masks[0])
    other = build_model(TrainConfig(model="mlp", hidden_layers=3, units=64, dropout=0.5, seed=4))
    assert not np.array_equal(_first_mask(other.get_layer("hidden0_dropout"), (8, 64)), masks[0])


def test_flip_and_shift_are_drawn_independently():
    # With one seed for both, every flipped image was shifted up and every other one down.
    cfg = TrainConfig(model="cnn", augment_flip=True, augment_translate=0.2, seed=0)
    model = build_model(cfg)
    n = 200
    left = np.zeros((n, 28, 28, 1), "float32")
    left[:, 10:18, 4:8] = 1.0  # a blob left of centre: flipped, it is right of centre
    flipped = np.asarray(model.get_layer("aug_flip")(left, training=True))
    flipped = flipped[:, 12, 20:24, 0].sum(1) > 0
    square = np.zeros((n, 28, 28, 1), "float32")
    square[:, 12:16, 12:16] = 1.0
    shifted = np.asarray(model.get_layer("aug_shift")(square, training=True))[..., 0]
    rows = np.array([np.nonzero(img.sum(1) > 0.5)[0].mean() for img in shifted])
    up = rows < 13.5  # the square's rows start at 12-15 without a shift
    assert 0.3 < flipped.mean() < 0.7
    for group in (up[flipped], up[~flipped]):
        assert 0.25 < group.mean() < 0.75


def test_unknown_config_key_raises():
    with pytest.raises(ConfigError, match="unknown config key.*filterz"):
        TrainConfig.from_dict({"model": "cnn", "filterz": 3})
    with pytest.raises(TypeError):
        TrainConfig(filterz=3)  # the plain constructor fails loudly too


@pytest.mark.parametrize(
    "bad,match",
    [(dict(model="transformer"), "model must be one of"), (dict(epochs=0), "epochs"),
     (dict(learning_rate=-1.0), "learning_rate"), (dict(blocks=2.5), "blocks must be an integer"),
     (dict(optimizer="rmsprop"), "optimizer")],
)
def test_bad_config_values_raise(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad)


def test_searcher_values_are_coerced():
    cfg = TrainConfig(blocks=np.int64(3), learning_rate=np.float64(0.01), batch_size=64.0,
                      batch_norm=1, convs_per_block=[2, 3, 3])
    assert type(cfg.blocks) is int and type(cfg.batch_size) is int
    assert type(cfg.learning_rate) is float and cfg.batch_norm is True
    assert cfg.convs_per_block == (2, 3, 3)


@pytest.mark.parametrize("values,match", [
    (dict(model="vgg", blocks=5), "blocks must be between 1 and 4 for 28x28 inputs, got 5"),
    (dict(model="cnn", blocks=0), "blocks must be between 1 and 4"),
    (dict(model="vgg", blocks=4, convs_per_block=(1, 2, 3)),
     "convs_per_block has 3 entries but blocks=4"),
    (dict(model="vgg", convs_per_block=0), "convs_per_block must be >= 1"),
    (dict(model="cnn", kernel_size=7), "kernel_size must be 3 or 5, got 7"),
    (dict(model="mlp", hidden_layers=6), "hidden_layers must be between 1 and 5, got 6"),
    (dict(model="resnet", stages=5), "stages must be between 1 and 4, got 5"),
    (dict(model="resnet", blocks_per_stage=0), "blocks_per_stage must be >= 1, got 0"),
])
def test_a_model_that_cannot_be_built_is_a_config_error(values, match):
    # The config refuses it (no Keras needed), so spaces and flags are checked before training
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**values)


def test_only_the_familys_own_architecture_keys_are_checked():
    # an mlp has no conv blocks, a cnn no hidden layers: their values do not matter there
    for values in (dict(model="mlp", blocks=9, kernel_size=7), dict(model="cnn", hidden_layers=9,
                                                                      stages=9)):
        build_model(TrainConfig(**values))
