"""Which images run on which GPUs and drivers: the host's label check and the container's self-check share
one rule, tested here on the fixture table of real devices."""

import pytest

from forge.contract.compat import ARCH_CAPABILITIES, arch_for, covers, image_problem
from forge.runner.selfcheck import gpu_problem
from tests.test_detect import DEVICES


@pytest.mark.parametrize("name, cc, memory, arch", DEVICES)
def test_each_device_runs_on_its_own_image_and_is_refused_by_the_others(name, cc, memory, arch):
    assert arch_for(cc) == arch
    for image, capabilities in ARCH_CAPABILITIES.items():
        problem = image_problem(image, capabilities, "12.8", [(name, cc)], "12.9", "0.1.0")
        if image == arch or (image == "ampere" and arch == "ada"):  # sm_86 code runs on 8.9 (same major)
            assert problem is None, (image, problem)
        else:
            assert problem is not None, image
            assert f"{name} is {cc}" in problem[0] and f"forge-runner:{arch}-0.1.0" in problem[1]


def test_binary_compatibility_holds_within_a_major_only():
    assert covers(["8.0"], "8.6") and covers(["8.6"], "8.9") and not covers(["8.6"], "8.0")
    assert not covers(["9.0"], "10.0") and not covers(["10.0"], "12.0") and covers(["10.0", "12.0"], "12.0")


def test_a_driver_older_than_the_images_cuda_is_refused():
    problem = image_problem("blackwell", ["10.0", "12.0"], "12.8", [("NVIDIA B200", "10.0")], "12.4", "0.1.0")
    assert problem and "CUDA 12.8" in problem[0] and "12.4" in problem[0] and "driver" in problem[1]
    assert image_problem("blackwell", ["10.0", "12.0"], "12.8", [("NVIDIA B200", "10.0")], "13.0", "0.1.0") is None


def test_the_container_self_check_reads_torchs_arch_list():
    hopper = ["sm_90", "compute_90"]
    assert gpu_problem("12.8", hopper, [("NVIDIA H100 80GB HBM3", "9.0")], "12.9") is None
    wrong = gpu_problem("12.8", hopper, [("NVIDIA GeForce RTX 4090", "8.9")], "12.9")
    assert wrong and "forge-runner:ada-" in wrong[1]
    nothing = gpu_problem("12.8", hopper, [], None)
    assert nothing and "no GPU is visible" in nothing[0] and "--cpu" in nothing[1]


@pytest.mark.docker
def test_the_host_refuses_an_image_whose_labels_do_not_cover_the_planned_gpu(engine):
    """A real image (labels only, on the CPU image) that says it is a Hopper build: fine for an H100 plan,
    refused for a B200 plan and for a driver too old for its CUDA, naming the fix."""
    import io

    from forge.errors import ImageError
    from forge.host import images
    from forge.host.detect import detect
    from forge.host.planner import image_name
    from tests.test_detect import Table

    tag = "forge-runner:hopper-compat-test"
    dockerfile = (f"FROM {image_name('cpu')}\nLABEL dev.forge.arch=hopper dev.forge.cuda=12.8 "
                  f"dev.forge.compute-capabilities=9.0 dev.forge.source={images.installed_source_digest()}\n")
    engine.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    try:
        h100 = detect(Table(("NVIDIA H100 80GB HBM3", "9.0", 81559)))
        assert images.check_image(tag, "hopper", h100).capabilities == ("9.0",)
        with pytest.raises(ImageError) as error:
            images.check_image(tag, "hopper", detect(Table(("NVIDIA B200", "10.0", 183359))))
        assert "NVIDIA B200 is 10.0" in error.value.message and "forge-runner:blackwell-" in error.value.hint
        old_driver = h100.model_copy(update={"cuda_driver_version": "12.2"})
        with pytest.raises(ImageError) as error:
            images.check_image(tag, "hopper", old_driver)
        assert "CUDA 12.8" in error.value.message and "Update the NVIDIA driver" in error.value.hint
    finally:
        engine.images.remove(tag, force=True)


def test_volta_and_turing_run_on_the_turing_image_only():
    for name, cc in (("Tesla V100-SXM2-16GB", "7.0"), ("Tesla T4", "7.5"), ("Quadro RTX 8000", "7.5")):
        assert arch_for(cc) == "turing"
        assert image_problem("turing", ARCH_CAPABILITIES["turing"], "12.8", [(name, cc)], "12.9", "0.1.0") is None
        problem = image_problem("ampere", ARCH_CAPABILITIES["ampere"], "12.8", [(name, cc)], "12.9", "0.1.0")
        assert problem and "forge-runner:turing-0.1.0" in problem[1]
    assert arch_for("7.2") is None  # Jetson Xavier: arm64 only


def test_bf16_starts_at_compute_capability_8():
    from forge.contract.compat import supports_bf16

    assert [cc for cc in ("6.1", "7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0") if supports_bf16(cc)] == [
        "8.0", "8.6", "8.9", "9.0", "10.0", "12.0"]


def test_the_family_names_are_defined_once():
    from typing import get_args

    from forge.contract.compat import ARCHES
    from forge.contract.plan import Arch
    from forge.host import images

    assert get_args(Arch) == ARCHES == ("cpu", *ARCH_CAPABILITIES) and images.ARCHES is ARCHES
