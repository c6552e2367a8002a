"""Config: dotted keys from every way in, type coercion, and one-line ConfigErrors."""
from __future__ import annotations

import pytest

from vqstudy.config import ConfigError, TrialConfig, all_keys


def test_nested_flat_and_mixed_dicts_agree():
    """A nested dict, a dotted dict and a mix build the same config."""
    nested = TrialConfig.from_dict({"quantizer": {"name": "simvq", "codebook_size": 1024}, "train": {"lr": 3e-4}})
    flat = TrialConfig.from_dict({"quantizer.name": "simvq", "quantizer.codebook_size": 1024, "train.lr": 3e-4})
    mixed = TrialConfig.from_dict({"quantizer": {"name": "simvq"}, "quantizer.codebook_size": 1024, "train.lr": 3e-4})
    assert nested == flat == mixed
    assert nested.quantizer.codebook_size == 1024 and nested.train.lr == 3e-4


def test_flat_roundtrip_covers_every_key():
    """to_flat() names every field by its dotted key and rebuilds the same config."""
    cfg = TrialConfig().with_overrides(["model.latent_dim=8", "data.num_train=100", "quantizer.levels=8,4"])
    flat = cfg.to_flat()
    assert sorted(flat) == sorted(all_keys())
    assert TrialConfig.from_dict(flat) == cfg


@pytest.mark.parametrize("assignment, key, expected", [
    ("train.lr=3e-4", "train.lr", 3e-4),                     # YAML would read '3e-4' as a string
    ("quantizer.codebook_size=1024", "quantizer.codebook_size", 1024),
    ("quantizer.codebook_size=1e3", "quantizer.codebook_size", 1000),
    ("quantizer.rotation_trick=true", "quantizer.rotation_trick", True),
    ("quantizer.rotation_trick=no", "quantizer.rotation_trick", False),
    ("data.num_train=null", "data.num_train", None),
    ("data.spread=1", "data.spread", 1.0),
    ("train.device=cuda:1", "train.device", "cuda:1"),
    ("quantizer.levels=8,5,5,5", "quantizer.levels", (8, 5, 5, 5)),
    ("quantizer.levels=[8, 5, 5, 5]", "quantizer.levels", (8, 5, 5, 5)),
    ("quantizer.levels=(8, 5, 5, 5)", "quantizer.levels", (8, 5, 5, 5)),    # as an MLflow param reads
])
def test_overrides_are_coerced(assignment, key, expected):
    """--set values arrive as strings and are typed by the field they name."""
    value = TrialConfig().with_overrides([assignment]).to_flat()[key]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("flat, message", [
    ({"quantizer.name": "vqq"}, "quantizer.name: 'vqq' is not one of vq, ema, simvq, cvq, ibq, fsq, lfq"),
    ({"quantizer.codebok_size": 8}, "quantizer.codebok_size: unknown key (did you mean quantizer.codebook_size?)"),
    ({"optimizer.lr": 1}, "optimizer.lr: unknown key"),
    ({"quantizer.codebook_size": "big"}, "quantizer.codebook_size: 'big' is not a valid int"),
    ({"quantizer.codebook_size": 1.5}, "quantizer.codebook_size: 1.5 is not a valid int"),
    ({"quantizer.codebook_size": True}, "quantizer.codebook_size: True is not a valid int"),
    ({"quantizer.codebook_size": 1}, "quantizer.codebook_size: 1 is out of range (must be >= 2)"),
    ({"train.steps": -5}, "train.steps: -5 is out of range (must be >= 1)"),
    ({"train.lr": 0}, "train.lr: 0.0 is out of range (must be > 0.0)"),
    ({"quantizer.decay": 1.5}, "quantizer.decay: 1.5 is out of range (must be < 1.0)"),
    ({"quantizer.decay": 1}, "quantizer.decay: 1.0 is out of range (must be < 1.0)"),   # cvq divides by 1 - decay
    ({"quantizer.init": "pca"}, "quantizer.init: 'pca' is not one of random, kmeans"),
    ({"quantizer.name": "simvq", "quantizer.init": "kmeans"}, "quantizer.init: kmeans needs a learnable codebook (vq, ema, cvq, ibq), not simvq"),
    ({"quantizer.warmup_steps": 10, "train.steps": 10}, "quantizer.warmup_steps: 10 leaves no quantized steps"),
    ({"data.name": "imagenet"}, "data.name: 'imagenet' is not one of gaussian_mixture, shapes, digits"),
    ({"train.device": "tpu"}, "train.device: 'tpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ({"train.steps": None}, "train.steps: a value is required (int)"),
    ({"data.download": "maybe"}, "data.download: 'maybe' is not a valid bool"),
    ({"quantizer": 3}, "quantizer: expected a mapping of quantizer.* keys"),
    ({"quantizer.levels": "8,x"}, "quantizer.levels: '8,x' is not a valid list of int or null"),
    ({"quantizer.levels": [8, 2]}, "quantizer.levels: 2 is out of range (every value must be >= 3)"),
    ({"quantizer.name": "fsq", "quantizer.codebook_size": 512},
     "quantizer.codebook_size: fsq knows levels for 256, 1024, 4096, 16384, 65536, 262144, not 512"),
    ({"quantizer.name": "fsq", "quantizer.levels": [8, 5, 5, 5]},
     "quantizer.levels: [8, 5, 5, 5] give 1,000 codes, but quantizer.codebook_size is 512 (set it to 1000)"),
    ({"quantizer.name": "lfq", "quantizer.codebook_size": 1000},
     "quantizer.codebook_size: lfq needs a power of two (2^bits codes), not 1000 (nearest: 512 or 1024)"),
    ({"quantizer.name": "fsq", "quantizer.codebook_size": 1024, "quantizer.init": "kmeans"},
     "quantizer.init: kmeans needs a learnable codebook (vq, ema, cvq, ibq), not fsq"),
    ({"quantizer.anchor": "nearest"}, "quantizer.anchor: 'nearest' is not one of probrandom, closest, random"),
])
def test_bad_values_name_the_key_and_what_is_allowed(flat, message):
    """Every bad value raises ConfigError whose one line names the key and the allowed values."""
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_dict(flat, source="t.yaml")
    text = str(err.value)
    assert text.startswith("t.yaml: ") and message in text and "\n" not in text


def test_bad_assignment_syntax():
    """A --set without '=' is rejected with an example of the right form."""
    with pytest.raises(ConfigError, match="expected key=value"):
        TrialConfig().with_overrides(["quantizer.codebook_size"])


@pytest.mark.parametrize("text, message", [
    ("quantizer: {name: vq\n", "YAML syntax error at line"),
    ("- a\n- b\n", "expected a mapping at the top level, got list"),
    ("train:\n  steps: 10\n  eval_every: [1]\n", "train.eval_every: [1] is not a valid int"),
    # PyYAML keeps the last of two equal keys and reads .nan/.inf as floats: refused here
    ("train: {lr: 0.1}\ntrain: {steps: 5}\n", "YAML error at line 2, column 1: duplicate key 'train'"),
    ("train: {lr: 0.1, lr: 0.2}\n", "duplicate key 'lr'"),
    ("train: {lr: .nan}\n", "train.lr: nan is not a finite number"),
    ("train: {lr: .inf}\n", "train.lr: inf is not a finite number"),
])
def test_yaml_errors_name_the_file(tmp_path, text, message):
    """YAML syntax, shape and value errors become one line starting with the file name."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        TrialConfig.from_yaml(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_file(tmp_path):
    """A missing config file is a ConfigError, not an OSError traceback."""
    with pytest.raises(ConfigError, match="cannot read"):
        TrialConfig.from_yaml(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    """Python object tags are refused by the safe loader."""
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="YAML error at line 1, column 8: could not determine a constructor"):
        TrialConfig.from_yaml(path)


def test_a_binary_file_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ConfigError, match="not a text file"):
        TrialConfig.from_yaml(path)
