"""params.yaml validation: errors name the key and what is allowed."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_params
from stages.training.loop import resolve_device
from tests.conftest import PROJECT


def write(tmp_path: Path, change) -> Path:
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    change(params)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def test_the_shipped_params_are_valid():
    params = load_params(PROJECT / "params.yaml")
    assert params.data.downloads.redial_zip.sha256.startswith("b4875668")


def test_unknown_key_names_its_path_and_the_allowed_keys(tmp_path):
    path = write(tmp_path, lambda p: p["ingest"].update(on_bad_records="skip"))
    with pytest.raises(ConfigError) as error:
        load_params(path)
    assert "ingest.on_bad_records: unknown key; allowed here: on_bad_record, valid_split" in str(error.value)


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, lambda p: p["data"]["files"].update(redial_valid="x.jsonl"))
    with pytest.raises(ConfigError, match=r"data\.files\.redial_valid: unknown key; allowed here: redial_train"):
        load_params(path)


def test_wrong_type(tmp_path):
    path = write(tmp_path, lambda p: p["data"].update(retries="three"))
    with pytest.raises(ConfigError, match=r"data\.retries: Input should be a valid integer.*got 'three'"):
        load_params(path)


def test_out_of_range(tmp_path):
    path = write(tmp_path, lambda p: p["ingest"].update(valid_fraction=1.5))
    with pytest.raises(ConfigError, match=r"ingest\.valid_fraction: Input should be less than 1 \(got 1\.5\)"):
        load_params(path)


def test_choice_lists_the_allowed_values(tmp_path):
    path = write(tmp_path, lambda p: p.update(device="tpu"))
    with pytest.raises(ConfigError, match=r"device: Input should be 'auto', 'cpu' or 'cuda' \(got 'tpu'\)"):
        load_params(path)


def test_missing_required_section(tmp_path):
    path = write(tmp_path, lambda p: p.pop("data"))
    with pytest.raises(ConfigError, match=r"data: required key is missing"):
        load_params(path)


def test_bad_checksum_format(tmp_path):
    path = write(tmp_path, lambda p: p["data"]["downloads"]["movies_imdb"].update(sha256="abc"))
    with pytest.raises(ConfigError, match=r"data\.downloads\.movies_imdb\.sha256: String should match pattern"):
        load_params(path)


def test_not_yaml(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "nope.yaml")


def test_data_source_auto_follows_the_environment(tmp_path, monkeypatch):
    params = load_params(PROJECT / "params.yaml")
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    assert params.data.resolved_source() == "download"
    assert params.data.resolved_mirror_dir(tmp_path) is None
    monkeypatch.setenv("C2CRS_DATA_DIR", str(tmp_path / "mirror"))
    assert params.data.resolved_source() == "mirror"
    assert params.data.resolved_mirror_dir(PROJECT) == tmp_path / "mirror"


def test_mirror_dir_in_params_is_relative_to_the_params_file(tmp_path, monkeypatch):
    monkeypatch.delenv("C2CRS_DATA_DIR", raising=False)
    params = load_params(write(tmp_path, lambda p: p["data"].update(mirror_dir="../shared/data")))
    assert params.data.resolved_source() == "mirror"
    assert params.data.resolved_mirror_dir(tmp_path) == (tmp_path / "../shared/data").resolve()


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in ("cpu", "cuda")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: cuda was asked for but torch sees no CUDA device"):
            resolve_device("cuda")


def test_an_ablation_variant_is_the_params_with_its_overrides(tmp_path):
    params = load_params(
        write(
            tmp_path,
            lambda p: p["ablations"].update(
                variants={"wo_ch": {"model.views": ["graph", "review"]}, "wo_fine": {"pretrain_fine.epochs": 0}}
            ),
        )
    )
    variant = params.variant("wo_ch")
    assert variant.model.views == ["graph", "review"] and variant.ablations.variants == {}
    assert variant.pretrain_fine == params.pretrain_fine and params.model.views == ["conversation", "graph", "review"]
    assert params.variant("wo_fine").pretrain_fine.epochs == 0
    path = tmp_path / "params.yaml"  # the file load_params read, named by its full path
    with pytest.raises(ConfigError, match=f"^{path}: ablations.variants has no 'wo_ud'"):
        params.variant("wo_ud")
    with pytest.raises(ConfigError, match=f"^{path}: conv_baselines.variants has no 'nope'"):
        params.variant("wo_ch").variant("nope", kind="conv_baselines")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.view": ["graph"]}, "ablations.variants.bad.model.view: unknown key; allowed here: token_dim"),
        (
            {"triples.context_max_tokens": 64},
            "ablations.variants.bad.triples.context_max_tokens: a variant of ablations may change only",
        ),
        (
            {"pretrain_fine.epochs": -1},
            "ablations.variants.bad: pretrain_fine.epochs: Input should be greater than or equal to 0",
        ),
        ({"model.views.graph": 1}, "ablations.variants.bad.model.views.graph: model.views is not a section"),
    ],
)
def test_a_bad_ablation_override_names_the_variant_and_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, lambda p: p["ablations"].update(variants={"bad": overrides})))
    assert message in str(error.value)


def test_a_conv_baseline_overrides_only_finetune_conv(tmp_path):
    params = load_params(
        write(
            tmp_path,
            lambda p: p["conv_baselines"].update(
                train=["transformer"],
                variants={
                    "transformer": {"finetune_conv.memories": ["history"], "finetune_conv.copy_mechanism": False}
                },
            ),
        )
    )
    variant = params.variant("transformer", kind="conv_baselines")
    assert variant.finetune_conv.memories == ["history"] and not variant.finetune_conv.copy_mechanism
    assert variant.conv_baselines.variants == {} and variant.ablations.variants == {}
    with pytest.raises(ConfigError) as error:
        load_params(
            write(tmp_path, lambda p: p["conv_baselines"].update(train=[], variants={"bad": {"model.token_dim": 64}}))
        )
    assert (
        "conv_baselines.variants.bad.model.token_dim: a variant of conv_baselines may change only finetune_conv"
        in str(error.value)
    )
    with pytest.raises(ConfigError, match="finetune_conv.memories: Value error, list each memory once"):
        load_params(write(tmp_path, lambda p: p["finetune_conv"].update(memories=["kg", "history", "kg"])))
    assert load_params(
        write(tmp_path, lambda p: p["finetune_conv"].update(memories=["kg", "history"]))
    ).finetune_conv.memories == ["kg", "history"]  # the order is the chain's
    for kgsf_only in ({"memories": ["history", "word"]}, {"freeze": ["word"]}, {"vocabulary_bias": True}):
        with pytest.raises(ConfigError, match="are KGSF's: they need pretrained: kgsf"):
            load_params(write(tmp_path, lambda p, kgsf_only=kgsf_only: p["finetune_conv"].update(kgsf_only)))
    with pytest.raises(ConfigError, match="architecture hred reads the history only, from fresh weights"):
        load_params(write(tmp_path, lambda p: p["finetune_conv"].update(architecture="hred")))
    with pytest.raises(ConfigError, match="vocabulary_bias reads the user's entity vector"):
        load_params(
            write(
                tmp_path,
                lambda p: p["finetune_conv"].update(
                    pretrained="kgsf", memories=["word", "history"], vocabulary_bias=True
                ),
            )
        )


def test_the_trained_baselines_are_known_and_bring_their_recommenders(tmp_path):
    with pytest.raises(ConfigError, match="list each baseline once"):
        load_params(write(tmp_path, lambda p: p["baselines"].update(train=["textcnn", "bert"])))
    with pytest.raises(ConfigError, match="train: list each variant once"):
        load_params(write(tmp_path, lambda p: p["conv_baselines"].update(train=["transformer", "transformer"])))
    with pytest.raises(ConfigError, match="whose recommender 'kecrs' is not in baselines.train"):
        load_params(write(tmp_path, lambda p: p["conv_baselines"].update(train=["kecrs"])))
    with pytest.raises(ConfigError, match="whose recommender 'redial' is not in baselines.train"):
        load_params(write(tmp_path, lambda p: p["conv_baselines"].update(train=["redial"])))
    everything = load_params(
        write(
            tmp_path,
            lambda p: (
                p["baselines"].update(train=["textcnn", "kbrd", "kgsf", "redial", "kecrs", "revcore"]),
                p["conv_baselines"].update(train=list(p["conv_baselines"]["variants"])),
            ),
        )
    )
    assert len(everything.conv_baselines.train) == 7


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("seed", True, "seed: Input should be a valid integer"),  # not 1
        ("seed", "42", "seed: Input should be a valid integer"),
        ("seed", 2**80, "seed: Input should be less than 4294967296"),
        ("ingest.valid_fraction", "0.2", "ingest.valid_fraction: Input should be a valid number"),
        ("model.token_dim", 64.0, "model.token_dim: Input should be a valid integer"),
        ("finetune_conv.copy_mechanism", "yes", "finetune_conv.copy_mechanism: Input should be a valid boolean"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_not_coerced(tmp_path, key, value, message):
    def change(params):
        *parents, last = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[last] = value

    with pytest.raises(ConfigError) as error:
        load_params(write(tmp_path, change))
    lines = str(error.value).splitlines()
    assert lines[0] == f"{tmp_path / 'params.yaml'}: 1 invalid value(s)"  # the file actually read
    assert len(lines) == 2 and message in lines[1]  # the one real error, no lines about variants


def test_a_key_given_twice_is_refused_and_yaml_1_2_numbers_are_numbers(tmp_path):
    text = (PROJECT / "params.yaml").read_text()
    doubled = tmp_path / "doubled.yaml"
    doubled.write_text(text.replace("seed: 42\n", "seed: 42\nseed: 7\n", 1))
    with pytest.raises(ConfigError, match=r"not valid YAML: key 'seed' given twice \(first on line \d+\)"):
        load_params(doubled)
    exponent = tmp_path / "exponent.yaml"
    exponent.write_text(text.replace("  learning_rate: 0.001\n", "  learning_rate: 1e-3\n", 1))
    assert load_params(exponent).pretrain_coarse.learning_rate == 0.001  # PyYAML alone reads '1e-3', a string


def _leaf_keys(section: dict, path: tuple = ()) -> list[tuple]:
    """Every key path of params.yaml, sections and leaves, but inside free-form maps (variants, study settings and
    extensions: their keys are names, not schema fields)."""
    free_form = {
        ("ablations", "variants"),
        ("conv_baselines", "variants"),
        ("study", "settings"),
        ("study", "extensions"),
    }
    keys = []
    for key, value in section.items():
        keys.append((*path, key))
        if isinstance(value, dict) and (*path, key) not in free_form:
            keys += _leaf_keys(value, (*path, key))
    return keys


def test_every_key_of_params_yaml_is_required(tmp_path):
    """params.yaml is the one set of defaults: the schema has none of its own, so deleting any key is an error that
    names it, never a silent fallback (a download's checksum is one of two: either may be absent)."""
    shipped = yaml.safe_load((PROJECT / "params.yaml").read_text())
    either = {"md5", "sha256"}
    checked = 0
    for path in _leaf_keys(shipped):
        if path[:2] == ("data", "downloads") and path[-1] in either:
            continue
        raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
        node = raw
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]
        target = tmp_path / "params.yaml"
        target.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=re.escape(f"{'.'.join(path)}: required key is missing")):
            load_params(target)
        checked += 1
    assert checked > 200
