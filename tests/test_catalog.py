from pathlib import Path

import pytest
import yaml

from forge.errors import ConfigError, ModelError
from forge.host import catalog

PLANS = Path(__file__).resolve().parents[1] / "plans"


@pytest.mark.parametrize("name, loader", [("models.yaml", catalog.models), ("presets.yaml", catalog.presets)])
def test_plans_files_round_trip(name, loader):
    raw = yaml.safe_load((PLANS / name).read_text())
    parsed = loader()
    assert set(parsed) == set(raw)
    for key, entry in parsed.items():
        assert type(entry).model_validate(entry.model_dump()) == entry
        assert entry == type(entry).model_validate(raw[key])


def test_unknown_model_names_the_catalog():
    with pytest.raises(ModelError) as err:
        catalog.resolve_model("gpt-17-ultra")
    assert "gpt-17-ultra" in err.value.message
    assert "smollm2-135m-instruct" in err.value.hint


def test_local_model_directory_needs_config_json(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        catalog.resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    name, entry, source = catalog.resolve_model(str(tmp_path))
    assert (name, entry, source.kind, source.path) == (tmp_path.name, None, "local", str(tmp_path.resolve()))


def test_the_converted_model_is_readable_by_the_images_user_too(smollm2_dir):
    """The model cache is shared by the host user and the image's user (uid 1000): transformers writes weights
    0600, which the other could not read."""
    assert {oct(path.stat().st_mode & 0o444) for path in smollm2_dir.iterdir()} == {oct(0o444)}


def _typos(name: str, rng) -> list[str]:
    """A few one-character slips of a name: a letter dropped, doubled, swapped with its neighbour, or upper-cased."""
    at = rng.randrange(1, len(name) - 1)
    return [name[:at] + name[at + 1:], name[:at] + name[at] + name[at:],
            name[:at - 1] + name[at] + name[at - 1] + name[at + 1:], name.upper()]


def test_a_mistyped_model_or_goal_suggests_the_name_meant():
    import random

    rng = random.Random(5)
    for name in catalog.models():
        for typo in _typos(name, rng):
            if typo.lower() == name:
                continue
            with pytest.raises(ModelError) as err:
                catalog.resolve_model(typo)
            assert "Did you mean" in err.value.message and name in err.value.message.split("Did you mean", 1)[1], typo
    for goal in catalog.presets():
        with pytest.raises(ConfigError, match=f"Did you mean {goal}") as err:
            catalog.preset(goal[:-1])
        assert "forge plan smoke" in err.value.hint  # the goal is the first argument, not a flag


def test_a_hub_id_points_at_its_catalog_name_or_says_hub_ids_are_not_supported_yet():
    entries = {key: entry.source.repo for key, entry in catalog.models().items() if entry.source.repo}
    for key, repo in entries.items():
        with pytest.raises(ModelError) as err:
            catalog.resolve_model(repo)
        assert f"the catalog calls that model {key!r}" in err.value.message and f"--model {key}" in err.value.hint
    with pytest.raises(ModelError) as err:
        catalog.resolve_model("some-org/some-model-7b")
    assert "Hub ids outside the catalog are not supported yet" in err.value.message
    assert "hf download some-org/some-model-7b --local-dir DIR" in err.value.hint
    with pytest.raises(ModelError) as err:
        catalog.resolve_model("gpt-17-ultra")
    assert "Did you mean" not in err.value.message and "Hub" not in err.value.message  # nothing near, not a Hub id
