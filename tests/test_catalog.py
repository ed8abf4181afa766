from pathlib import Path

import pytest
import yaml

from forge.errors import ModelError
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
