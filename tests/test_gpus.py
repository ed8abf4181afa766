"""plans/gpus.yaml, the known parts `forge plan --target` plans for: the table round-trips, agrees with the
fixture table of real devices and with the compatibility rule, and names are found however they are written."""

import pytest
import yaml
from hypothesis import given, strategies as st

from forge.contract.compat import arch_for, supports_bf16
from forge.errors import ConfigError
from forge.host.detect import detect
from forge.host.gpus import IDLE_RESERVED_MIB, GpuPart, TargetProvider, find, parse_target, parts
from tests.conftest import REPO
from tests.test_detect import DEVICES

TABLE = REPO / "plans" / "gpus.yaml"
# The parts the issue promises (A100 40/80, RTX 3090/4090/5090, L4, L40S, H100, H200, B200, T4, V100 16/32).
PROMISED = {"a100-40gb", "a100-80gb", "rtx-3090", "rtx-4090", "rtx-5090", "l4", "l40s", "h100", "h200", "b200", "t4",
            "v100-16gb", "v100-32gb"}


def test_the_table_round_trips_and_holds_the_promised_parts():
    raw = yaml.safe_load(TABLE.read_text())
    assert {name: part.model_dump() for name, part in parts().items()} == raw
    assert set(parts()) == PROMISED


def test_each_part_is_a_fixture_device_with_the_same_numbers():
    """The fixture table (as NVML reports these parts) and plans/gpus.yaml say the same about each part."""
    fixtures = {name: (cc, memory, arch) for name, cc, memory, arch in DEVICES}
    for name, part in parts().items():
        assert fixtures[part.product] == (part.compute_capability, part.memory_mib, arch_for(part.compute_capability)), name
        assert part.bf16 == supports_bf16(part.compute_capability)


def test_a_bf16_flag_that_contradicts_the_compute_capability_is_refused():
    with pytest.raises(ValueError, match="bf16"):
        GpuPart(product="Tesla T4", compute_capability="7.5", memory_mib=15360, bf16=True)
    with pytest.raises(ValueError, match="no Forge image"):
        GpuPart(product="Tesla P100", compute_capability="6.0", memory_mib=16384, bf16=False)


@pytest.mark.parametrize("written, name", [("T4", "t4"), ("Tesla T4", "t4"), ("RTX 4090", "rtx-4090"),
                                           ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("a100_80gb", "a100-80gb"),
                                           ("H100", "h100"), ("NVIDIA H100 80GB HBM3", "h100"), ("L40S", "l40s"),
                                           ("Tesla V100-SXM2-32GB", "v100-32gb")])
def test_names_are_found_however_they_are_written(written, name):
    assert find(written)[0] == name


def _near_misses(name: str) -> list[str]:
    """Every single-character deletion, adjacent swap, substitution and insertion of a name."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    edits = {name[:i] + name[i + 1:] for i in range(len(name))}
    edits |= {name[:i] + name[i + 1] + name[i] + name[i + 2:] for i in range(len(name) - 1)}
    edits |= {name[:i] + c + name[i + 1:] for i in range(len(name)) for c in letters}
    edits |= {name[:i] + c + name[i:] for i in range(len(name) + 1) for c in letters}
    return sorted(edit for edit in edits if edit.strip("-"))


@pytest.mark.parametrize("name", sorted(PROMISED))
def test_a_near_miss_is_refused_with_a_did_you_mean_and_the_known_names(name):
    """Every one-character slip that names no known part is an error that suggests the part meant."""
    misses = [miss for miss in _near_misses(name) if miss not in parts()]
    for miss in misses:
        try:
            found, _ = find(miss)
        except ConfigError as error:
            assert f"Unknown GPU {miss!r}" in error.message
            assert "Did you mean" in error.message and name in error.message.split("Did you mean", 1)[1], miss
            assert all(known in error.hint for known in parts()) and "plans/gpus.yaml" in error.hint
        else:  # only a spelling that normalises to a known name (a dropped separator: "rtx4090") may pass
            assert miss.replace("-", "") == found.replace("-", ""), (miss, found)


@given(st.text(min_size=1, max_size=20))
def test_any_name_is_found_or_refused_with_the_known_names(text):
    try:
        name, part = find(text)
    except ConfigError as error:
        assert all(known in error.hint for known in parts())
    else:
        assert parts()[name] == part


@pytest.mark.parametrize("text, count", [("h100", 1), ("h100:8", 8), ("T4:2", 2)])
def test_a_count_gives_that_many_idle_gpus_named_by_index(text, count):
    provider = TargetProvider(text)
    hardware = detect(provider)
    part = provider.part
    assert [(g.index, g.uuid) for g in hardware.gpus] == [(i, str(i)) for i in range(count)]
    assert {(g.name, g.compute_capability, g.memory_total_mib, g.memory_free_mib) for g in hardware.gpus} == {
        (part.product, part.compute_capability, part.memory_mib, part.memory_mib - IDLE_RESERVED_MIB)}
    assert hardware.target == (provider.name if count == 1 else f"{provider.name}:{count}")
    assert "not detected" in hardware.note and f"--target {hardware.target}" in hardware.note
    assert (hardware.driver_version, hardware.cuda_driver_version) == (None, None)


@pytest.mark.parametrize("text", ["h100:0", "h100:x", "h100:", "h100:65", "h100:-1"])
def test_a_bad_count_is_a_clear_error(text):
    with pytest.raises(ConfigError) as error:
        parse_target(text)
    assert "count" in error.value.message and "h100:8" in error.value.hint
