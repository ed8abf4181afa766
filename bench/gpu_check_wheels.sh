#!/usr/bin/env bash
# The wheels bench/gpu_check.py needs on a bare GPU box that has Python 3.12 with torch, transformers, peft,
# accelerate and nvidia-ml-py but nothing else of Forge's stack (and no network): run this where pip reaches
# PyPI, bring the folder along (46 MB, bitsandbytes 43 MB of it: leave it out to skip the 4-bit points).
#
#   bash bench/gpu_check_wheels.sh wheels-gpu [--no-bitsandbytes]
#   # on the GPU box:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels-gpu/*.whl
#   PYTHONPATH=/tmp/site python3 bench/gpu_check.py --out gpu-check
set -euo pipefail
dest=${1:?usage: gpu_check_wheels.sh DIR [--no-bitsandbytes]}
python=${PYTHON_VERSION:-3.12}
# The GPU images' pins (images/requirements-cuda.txt), which transformers 5.17 accepts, and what they need
# beyond a torch box: pydantic for forge.contract, datasets' own small dependencies.
wheels=(pydantic==2.14.3 pydantic-core==2.50.4 annotated-types typing-inspection typing-extensions
        trl==1.15.0 datasets==4.8.5 "dill<0.4.2" "multiprocess<0.70.20")
[ "${2:-}" = "--no-bitsandbytes" ] || wheels+=(bitsandbytes==0.50.2)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014; do
  platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$python" --implementation cp \
  "${platforms[@]}" -d "$dest" "${wheels[@]}"
du -sh "$dest"
