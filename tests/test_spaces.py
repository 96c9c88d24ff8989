import re
from pathlib import Path

import numpy as np
import pytest

from fmnist.models import build_model
from search.spaces import SpaceError, list_spaces, load_space, parse_override

EXPECTED = {"mlp", "cnn", "vgg", "resnet", "seed-vgg"}


def test_all_spaces_are_shipped():
    assert EXPECTED <= set(list_spaces())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_space_loads_and_a_sample_builds(name):
    space = load_space(name)
    for seed in range(2):
        cfg = space.config(space.sample(np.random.default_rng(seed)))
        model = build_model(cfg)
        assert model.output_shape == (None, 10)
        assert cfg.model == space.fixed["model"]
    for key in ("learning_rate", "weight_decay"):  # every space searches these
        assert space.dists[key].log
    assert "batch_size" in space.dists or "batch_size" in space.fixed


def test_family_spaces_search_depth_and_width():
    depth = {"mlp": "hidden_layers", "cnn": "blocks", "vgg": "blocks", "resnet": "stages"}
    width = {"mlp": "units", "cnn": "base_filters", "vgg": "base_filters",
             "resnet": "base_filters"}
    for name in depth:
        space = load_space(name)
        assert depth[name] in space.dists and width[name] in space.dists
        assert "batch_size" in space.dists


def test_seed_vgg_is_notebook_000():
    space = load_space("seed-vgg")
    cfg = space.config(space.sample(np.random.default_rng(0)))
    assert cfg.convs_per_block == (2, 2, 3, 3) and cfg.base_filters == 32
    assert (cfg.dense_units, cfg.dropout, cfg.batch_size, cfg.epochs) == (256, 0.3, 64, 50)
    assert (cfg.optimizer, cfg.momentum, cfg.lr_schedule) == ("sgd", 0.9, "cosine")
    assert space.dists["weight_decay"].args == (3e-4, 1e-2)
    assert space.dists["learning_rate"].args == (1e-3, 1e-1)


@pytest.mark.parametrize(
    "text,match",
    [
        ("model: mlp\nfilterz: 3\n", r"filterz: unknown key"),
        ("model: mlp\nlearning_rate: {loguniform: [0, 0.1]}\n", r"lower bound must be > 0"),
        ("model: mlp\nunits: {choice: []}\n", r"units: empty choice"),
        ("model: mlp\nepochs: -3\n", r"epochs must be >= 1"),
        ("model: mlp\nunits: {gaussian: [1, 2]}\n", r"unknown distribution 'gaussian'"),
        ("model: mlp\ndropout: {uniform: [0.5, 0.1]}\n", r"lower bound 0.5 must be below"),
        ("model: mlp\ndropout: {uniform: [0.0, 1.5]}\n", r"dropout: 1.5 is not valid"),
        ("units: 8\n", r"model: must be a fixed value"),
        ("model: mlp\nunits: !!python/object/apply:os.system ['true']\n", r"not valid YAML"),
        ("- 1\n- 2\n", r"expected a mapping"),
        ("model: mlp\nunits: 8\nunits: 16\n", r"not valid YAML \('units' is given twice \(line 3"),
        ("model: mlp\nunits: {choice: [8], choice: [16]}\n", r"'choice' is given twice \(line 2"),
        ("model: mlp\nunits: &x [1, *x]\n", r"units must be an integer, got \[1, \[\.\.\.\]\]"),
        ("model: mlp\nlearning_rate: '1e-3'\n", r"must be a number, got '1e-3'"),  # quoted: text
        (b"model: mlp\n\xff\xfe\n", r"not a text file \(not UTF-8 at byte 11\)"),
    ],
)
def test_bad_space_files_name_file_key_and_problem(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SpaceError, match=match) as info:
        load_space(str(path))
    assert str(path) in str(info.value)


def test_overrides_pin_and_replace_distributions():
    space = load_space("cnn", dict([parse_override("blocks=3"),
                                    parse_override("dropout={choice: [0.1, 0.2]}")]))
    assert space.fixed["blocks"] == 3 and "blocks" not in space.dists
    assert space.dists["dropout"].kind == "choice"
    with pytest.raises(SpaceError, match="expected key=value"):
        parse_override("blocks")


def test_architecture_checks_use_the_spaces_values_not_the_defaults(tmp_path):
    # 3 fixed conv counts fit every draw of blocks {choice: [3]}, though blocks' default is 2
    path = tmp_path / "vgg3.yaml"
    path.write_text("model: vgg\nconvs_per_block: [1, 2, 2]\nblocks: {choice: [3]}\n")
    assert load_space(str(path)).fixed["convs_per_block"] == [1, 2, 2]
    path.write_text("model: vgg\nconvs_per_block: [1, 2, 2]\nblocks: {choice: [3, 4]}\n")
    with pytest.raises(SpaceError, match=r"blocks: 4 is not valid \(convs_per_block has 3"):
        load_space(str(path))  # a draw of 4 blocks could not be built
    # a --set that does not fit the (valid) file is named, with the file's key it breaks
    path.write_text("model: vgg\nconvs_per_block: 1\nblocks: {choice: [3, 4]}\n")
    with pytest.raises(SpaceError, match=rf"^--set convs_per_block: {re.escape(str(path))}: "
                       r"blocks: 4 is not valid"):
        load_space(str(path), dict([parse_override("convs_per_block=[1, 2, 2]")]))


@pytest.mark.parametrize(
    "override,match",
    [
        ("filterz=3", r"^--set filterz: unknown key"),
        ("batch_size=0", r"^--set batch_size: batch_size must be >= 1"),
        ("batch_size={choice: [0, 64]}", r"^--set batch_size: 0 is not valid"),
        ("learning_rate={loguniform: [0, 1]}", r"^--set learning_rate: loguniform lower bound"),
        ("model=xyz", r"^--set model: model must be one of"),
    ],
)
def test_a_bad_override_is_blamed_on_its_set_not_the_file(tmp_path, override, match):
    with pytest.raises(SpaceError, match=match):
        load_space("cnn", dict([parse_override(override)]))
    path = tmp_path / "bad.yaml"  # and the file's own mistake still names the file
    path.write_text("model: mlp\ndropout: {uniform: [0.0, 1.5]}\n")
    with pytest.raises(SpaceError, match=rf"^{re.escape(str(path))}: dropout: 1.5 is not valid"):
        load_space(str(path), dict([parse_override("units=8")]))


def test_a_key_the_spaces_configs_never_read_is_refused(tmp_path):
    # vgg's convolutions are 3x3, so a sampled kernel_size would be a dimension the search
    # explores for nothing (and the leaderboard would show it as if it mattered).
    path = tmp_path / "v.yaml"
    path.write_text("model: vgg\nkernel_size: {choice: [3, 5]}\n")
    with pytest.raises(SpaceError, match=rf"^{re.escape(str(path))}: kernel_size: model vgg does "
                       r"not read it \(kernel_size is for model cnn\); leave it out of the space$"):
        load_space(str(path))
    assert "kernel_size" in load_space(str(path), check_read=False).dists  # a resumed search
    path.write_text("model: resnet\ndense_units: 128\n")  # fixed ones too: recorded, ignored
    with pytest.raises(SpaceError, match="dense_units: model resnet does not read it"):
        load_space(str(path))
    # the optimizer and the schedule, fixed, left out (their defaults) or sampled
    with pytest.raises(SpaceError, match=r"^--set momentum: optimizer adam or adamw does not "
                       r"read it \(momentum is for optimizer sgd\); leave it out$"):
        load_space("cnn", dict([parse_override("momentum={uniform: [0.8, 0.99]}")]))
    path.write_text("model: mlp\nstep_gamma: 0.5\n")
    with pytest.raises(SpaceError, match="step_gamma: lr_schedule constant does not read it"):
        load_space(str(path))
    path.write_text("model: mlp\nlr_schedule: {choice: [cosine, step]}\n"
                    "step_every: {choice: [2, 4]}\noptimizer: sgd\n"
                    "nesterov: {choice: [false, true]}\n")
    assert set(load_space(str(path)).dists) == {"lr_schedule", "step_every", "nesterov"}
    # a --set that leaves a key of a valid file unread is named, with the key
    with pytest.raises(SpaceError, match=r"^--set model: .*cnn.yaml: kernel_size: model vgg does "
                       r"not read it .*; use a space file without it$"):
        load_space("cnn", dict([parse_override("model=vgg")]))
    # vgg's only dropout is in its dense layer: with dense_units 0 a sampled dropout is noise
    with pytest.raises(SpaceError, match=r"^--set dense_units: .*vgg.yaml: dropout: model vgg "
                       r"with dense_units 0 does not read it .*; use a space file without it$"):
        load_space("vgg", dict([parse_override("dense_units=0")]))
    # a --set of the key itself: leaving the --set out would bring the file's back
    with pytest.raises(SpaceError, match=r"^--set dropout: model vgg with dense_units 0 .*; the "
                       r"space file gives it too: use one without it$"):
        load_space("vgg", dict([parse_override("dense_units=0"), parse_override("dropout=0")]))
    path.write_text("model: vgg\ndense_units: {choice: [0, 128]}\ndropout: 0.3\n")
    assert load_space(str(path)).fixed["dropout"] == 0.3  # read where dense_units is 128
    path.write_text("model: vgg\ndense_units: 0\ndropout: {uniform: [0.0, 0.5]}\n")
    with pytest.raises(SpaceError, match=r"dropout: model vgg with dense_units 0 does not read "
                       r"it \(vgg's dropout is in its dense layer, which dense_units 0 leaves "
                       r"out\); leave it out of the space$"):
        load_space(str(path))
    # thread counts: each trial's come from --cpus-per-trial, whatever the space says
    with pytest.raises(SpaceError, match=r"^--set intra_op_threads: a search sets each trial's "
                       r"threads from --cpus-per-trial; leave it out$"):
        load_space("cnn", dict([parse_override("intra_op_threads=4")]))
    for name in list_spaces():  # the shipped spaces read every key they give
        load_space(name)


def test_exponents_without_a_dot_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; users write it, Python and YAML 1.2 read a float
    path = tmp_path / "e.yaml"
    path.write_text("model: cnn\nlearning_rate: {loguniform: [1e-4, 1E-2]}\n"
                    "weight_decay: {choice: [0, 5e-4, -0e0]}\noptimizer: adam\n")
    space = load_space(str(path), dict([parse_override("dropout=2.5e-1"),
                                        parse_override("label_smoothing={uniform: [0, 1e-1]}")]))
    assert space.dists["learning_rate"].args == (1e-4, 1e-2)
    assert space.dists["weight_decay"].args == (0, 5e-4, 0.0)
    assert space.dists["label_smoothing"].args == (0, 0.1)
    assert space.fixed["dropout"] == 0.25 and space.fixed["optimizer"] == "adam"
    assert parse_override("optimizer=1e3x") == ("optimizer", "1e3x")  # not a number: kept
    with pytest.raises(SpaceError, match="not valid YAML"):  # still the safe loader underneath
        load_space(str(path), dict([parse_override("dropout=!!python/name:os.system")]))


def test_unknown_space_lists_available():
    with pytest.raises(SpaceError, match="unknown space 'nope'; available: .*vgg"):
        load_space("nope")


def test_a_space_path_that_is_not_a_file_says_what_it_is(tmp_path):
    for path, what in ((tmp_path / "none.yaml", "does not exist"),
                       (tmp_path, "is a folder, not a YAML file"),
                       (Path("/dev/null"), "is not a regular file")):
        with pytest.raises(SpaceError, match=f"^space file {re.escape(str(path))} {what}$"):
            load_space(str(path))
