"""Keras model families built from one config: `MODELS = {"mlp", "cnn", "vgg", "resnet"}`.

Keras 3 APIs only (no `tf.*`), so the same code runs under KERAS_BACKEND=tensorflow or jax.
Every model takes raw uint8 images of shape (28, 28) and returns 10 softmax probabilities;
normalization and augmentation are layers inside the model, so a saved model is self-contained.
The config is a `fmnist.config.TrainConfig`, which has already checked that its family can be
built (`TrainConfig.architecture_problem`: 1-4 pooling blocks on 28x28, and so on).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from fmnist.startup import import_keras

import_keras()  # before `import keras`: TensorFlow's start-up lines, filtered
import keras  # noqa: E402
from keras import layers  # noqa: E402

# Fashion-MNIST train-split pixel statistics (DESIGN.md). One channel: the normalization is
# global over the single channel axis, not per pixel-column (the seeds' Normalization bug).
PIXEL_MEAN = 72.94
PIXEL_STD = 90.02
INPUT_SHAPE = (28, 28)
NUM_CLASSES = 10


def _seed(cfg: Any, layer: str) -> int:
    """The seed of one random layer (dropout, augmentation): `cfg.seed` mixed with its name.

    Keras layers given the same seed draw the same numbers at every step: two dropout layers of
    one width dropped the same units, masks of other shapes shared their leading draws, and
    with one seed for both augmentations every flipped image was shifted up and every other one
    down (measured on Keras 3.15). Each layer's own seed keeps a run reproducible from
    `cfg.seed` and its random streams independent.
    """
    return (cfg.seed + zlib.crc32(layer.encode())) % 2**32


def _dropout(cfg: Any, rate: float, name: str) -> layers.Dropout:
    return layers.Dropout(rate, seed=_seed(cfg, name), name=name)


def _l2(cfg: Any) -> keras.regularizers.Regularizer | None:
    # AdamW decays weights in the optimizer (decoupled); adding L2 as well would count it twice.
    if cfg.weight_decay > 0 and cfg.optimizer != "adamw":
        return keras.regularizers.L2(cfg.weight_decay)
    return None


def _batch_norm(name: str) -> layers.BatchNormalization:
    # Keras's default momentum 0.99 needs ~500 steps for the moving statistics to forget their
    # initial values; a 12k-image epoch at batch 256 has 47. With 0.99, BN models validate
    # badly after one epoch and early stopping kills them for it. 0.9 converges in ~50 steps.
    return layers.BatchNormalization(momentum=0.9, name=name)


def _stem(cfg: Any) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """Input, normalization and optional augmentation shared by every family."""
    inputs = keras.Input(shape=INPUT_SHAPE, dtype="uint8", name="image")
    x = layers.Reshape((*INPUT_SHAPE, 1), name="add_channel")(inputs)
    # Rescaling casts uint8 to float and standardizes with the dataset statistics.
    x = layers.Rescaling(1.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize")(x)
    background = -PIXEL_MEAN / PIXEL_STD  # a black pixel after normalization
    if cfg.augment_flip:
        x = layers.RandomFlip("horizontal", seed=_seed(cfg, "aug_flip"), name="aug_flip")(x)
    if cfg.augment_translate > 0:
        t = cfg.augment_translate
        x = layers.RandomTranslation(
            t, t, fill_mode="constant", fill_value=background, seed=_seed(cfg, "aug_shift"),
            name="aug_shift",
        )(x)
    return inputs, x


def _conv_bn_relu(x, filters: int, kernel: int, cfg: Any, name: str, strides: int = 1):
    x = layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=not cfg.batch_norm,  # BN's shift makes the bias redundant
        kernel_regularizer=_l2(cfg),
        name=f"{name}_conv",
    )(x)
    if cfg.batch_norm:
        x = _batch_norm(name=f"{name}_bn")(x)
    return layers.Activation("relu", name=f"{name}_relu")(x)


def _classes(x, cfg: Any):
    # float32 probabilities even under mixed precision, so losses and confidences are exact.
    return layers.Dense(
        NUM_CLASSES, activation="softmax", dtype="float32", kernel_regularizer=_l2(cfg),
        name="classes",
    )(x)


def _head(x, cfg: Any, inputs, name: str) -> keras.Model:
    if cfg.dense_units > 0:
        x = layers.Dense(cfg.dense_units, kernel_regularizer=_l2(cfg), name="dense")(x)
        x = layers.Activation("relu", name="dense_relu")(x)
        if cfg.dropout > 0:
            x = _dropout(cfg, cfg.dropout, "dense_dropout")(x)
    outputs = _classes(x, cfg)
    return keras.Model(inputs, outputs, name=name)


def _filters(cfg: Any, block: int) -> int:
    return min(cfg.base_filters * 2**block, cfg.max_filters)


def _per_block(value: int | tuple[int, ...], blocks: int) -> tuple[int, ...]:
    return (value,) * blocks if isinstance(value, int) else tuple(value)


def build_mlp(cfg: Any) -> keras.Model:
    """Fully connected baseline: 1-5 hidden layers of `units`, ReLU, optional BN and dropout."""
    inputs, x = _stem(cfg)
    x = layers.Flatten(name="flatten")(x)
    for i in range(cfg.hidden_layers):
        x = layers.Dense(cfg.units, kernel_regularizer=_l2(cfg), name=f"hidden{i}")(x)
        if cfg.batch_norm:
            x = _batch_norm(name=f"hidden{i}_bn")(x)
        x = layers.Activation("relu", name=f"hidden{i}_relu")(x)
        if cfg.dropout > 0:
            x = _dropout(cfg, cfg.dropout, f"hidden{i}_dropout")(x)
    outputs = _classes(x, cfg)
    return keras.Model(inputs, outputs, name="mlp")


def build_cnn(cfg: Any) -> keras.Model:
    """The notebooks' small CNNs: `blocks` x (conv, [BN], ReLU, max-pool, [dropout]), dense."""
    inputs, x = _stem(cfg)
    for b in range(cfg.blocks):
        x = _conv_bn_relu(x, _filters(cfg, b), cfg.kernel_size, cfg, f"block{b}")
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
        if cfg.dropout > 0:
            x = _dropout(cfg, cfg.dropout / 2, f"block{b}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    return _head(x, cfg, inputs, "cnn")


def build_vgg(cfg: Any) -> keras.Model:
    """VGG-style: blocks of 3x3 convs, filters doubling per block up to `max_filters`.

    `convs_per_block` is one number for every block or one per block, so notebook 000's
    CustomVGG is blocks=4, convs_per_block=(2, 2, 3, 3), base_filters=32, dense_units=256,
    dropout=0.3.
    """
    convs = _per_block(cfg.convs_per_block, cfg.blocks)
    inputs, x = _stem(cfg)
    for b, n in enumerate(convs):
        for c in range(n):
            x = _conv_bn_relu(x, _filters(cfg, b), 3, cfg, f"block{b}_{c}")
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    x = layers.Flatten(name="flatten")(x)
    return _head(x, cfg, inputs, "vgg")


def build_resnet(cfg: Any) -> keras.Model:
    """Small ResNet: stem conv, `stages` of `blocks_per_stage` basic blocks, global pooling.

    stages=4, blocks_per_stage=1 is notebook 000's ResNet-10 (1 + 4x2 convs + 1 dense).
    Stages after the first halve the resolution with a strided conv and a 1x1 projection.
    """
    inputs, x = _stem(cfg)
    x = _conv_bn_relu(x, cfg.base_filters, 3, cfg, "stem")
    for s in range(cfg.stages):
        filters = _filters(cfg, s)
        for b in range(cfg.blocks_per_stage):
            name = f"stage{s}_block{b}"
            strides = 2 if (s > 0 and b == 0) else 1
            shortcut = x
            y = _conv_bn_relu(x, filters, 3, cfg, f"{name}_a", strides=strides)
            y = layers.Conv2D(
                filters, 3, padding="same", use_bias=not cfg.batch_norm,
                kernel_regularizer=_l2(cfg), name=f"{name}_b_conv",
            )(y)
            if cfg.batch_norm:
                y = _batch_norm(name=f"{name}_b_bn")(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = layers.Conv2D(
                    filters, 1, strides=strides, use_bias=False,
                    kernel_regularizer=_l2(cfg), name=f"{name}_proj",
                )(shortcut)
            x = layers.Activation("relu", name=f"{name}_out")(layers.Add(name=f"{name}_add")(
                [y, shortcut]
            ))
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    if cfg.dropout > 0:
        x = _dropout(cfg, cfg.dropout, "gap_dropout")(x)
    outputs = _classes(x, cfg)
    return keras.Model(inputs, outputs, name="resnet")


MODELS: dict[str, Callable[[Any], keras.Model]] = {
    "mlp": build_mlp,
    "cnn": build_cnn,
    "vgg": build_vgg,
    "resnet": build_resnet,
}


def build_model(cfg: Any) -> keras.Model:
    """Build the (uncompiled) model named by `cfg.model`."""
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose one of {', '.join(MODELS)}")
    return MODELS[cfg.model](cfg)
