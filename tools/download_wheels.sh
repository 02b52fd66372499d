#!/usr/bin/env bash
# Download into .whl/ the wheels tools/gpu_check.sh installs on the device machine (nvidia-h200: Python 3.12,
# manylinux x86_64, no network): wandb, torch-fidelity, torchcfm and POT, and every package they need that the
# machine's image lacks. Run it here, in the repository root's checkout that makes the device call:
#
#   bash tools/download_wheels.sh         # prints each decision and the total, which must stay under 64 MiB
#
# The needs are read from each wheel's Requires-Dist (markers evaluated for CPython 3.12 on Linux x86_64),
# recursively. A need the image has is not carried, except the three whose required minimum is recent while
# the image's version is unknown (RECENT_MINIMUMS). Each package gets one version: the one installed in the
# Python running this script (the combination the CPU suite passes with) when it fits, else pip's newest fit.
set -euo pipefail
cd "$(dirname "$0")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"  # the wheels travel, uncommitted
rm -rf .whl
mkdir -p .whl
"${PYTHON:-python3}" - <<'EOF'
import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

# What gpu_check.sh needs beyond the image: W&B for every test, torch-fidelity for the FID-feature benchmark,
# torchcfm's UNet for the flow benchmark's reference row (requirements-torchcfm.txt).
TOP = ["wandb>=0.19", "torch-fidelity==0.4.0", "torchcfm==1.0.7", "pot==0.9.6.post1"]
# torchcfm's UNet and flow matcher import torch, numpy and POT only; its other needs (torchdyn, which pulls
# pytorch-lightning, ipykernel and more) serve its utils module, which nothing here imports.
NO_DEPS = {"torchcfm"}
# The image's Python packages, from /work/.library/device/KINDS.md ("Python packages already there", 2026-11-17).
IMAGE = set(map(canonicalize_name, """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2
joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti
nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client propcache
protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest
pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex
requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate
tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()))
# On the image at an unseen version, while this tree needs a recent one: wandb click>=8.2.0 (2025-05),
# pydantic typing-extensions>=4.16, googleapis-common-protos protobuf>=6.33.5. Carried, shadowing the image's.
RECENT_MINIMUMS = {"click", "typing-extensions", "protobuf"}
PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 40)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
TARGET = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3",
                                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                                  "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                                  "os_name": "posix"}
WHEELS = Path(".whl")


def local_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def download(requirement):
    """Download one wheel for `requirement` (no dependencies); return its path."""
    name = canonicalize_name(requirement.name)
    installed = local_version(name)
    pin = (f"{name}=={installed}" if installed and requirement.specifier.contains(installed, prereleases=True)
           else f"{name}{requirement.specifier}")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *[flag for platform in PLATFORMS for flag in ("--platform", platform)],
                    "-d", str(WHEELS), pin], check=True)
    [path] = [path for path in WHEELS.glob("*.whl") if canonicalize_name(parse_wheel_filename(path.name)[0]) == name]
    return path


def needs(wheel, extras):
    """The requirements in the wheel's METADATA that apply on the device for the given extras."""
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [item for item in archive.namelist() if item.endswith(".dist-info/METADATA")]
        lines = archive.read(metadata).decode().splitlines()
    found = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            applies = requirement.marker is None or any(requirement.marker.evaluate(TARGET | {"extra": extra})
                                                        for extra in extras | {""})
            if applies:
                found.append(requirement)
    return found


chosen, wheel_of, extras_of, queue = {}, {}, {}, [(Requirement(text), "top") for text in TOP]
while queue:
    requirement, parent = queue.pop(0)
    name = canonicalize_name(requirement.name)
    if name in IMAGE and name not in RECENT_MINIMUMS:
        print(f"  {name}{requirement.specifier} (for {parent}): on the image")
        continue
    if name in chosen:
        if not requirement.specifier.contains(chosen[name], prereleases=True):
            sys.exit(f"download_wheels.sh: {parent} needs {requirement}, but {name} {chosen[name]} was chosen")
        if not set(requirement.extras) <= extras_of[name]:  # an extra adds needs of its own
            extras_of[name] |= set(requirement.extras)
            queue += [(need, name) for need in needs(wheel_of[name], extras_of[name])]
        continue
    wheel = download(requirement)
    chosen[name], wheel_of[name] = str(parse_wheel_filename(wheel.name)[1]), wheel
    extras_of[name] = set(requirement.extras)
    why = "image version unseen, minimum recent" if name in IMAGE else "absent from the image"
    print(f"{wheel.name} (for {parent}: {requirement}; {why})")
    if name not in NO_DEPS:
        queue += [(need, name) for need in needs(wheel, extras_of[name])]

total = sum(path.stat().st_size for path in WHEELS.glob("*.whl"))
print(f"{len(chosen)} wheels, {total / 2**20:.1f} MiB in .whl/ (the device call carries at most 64 MiB with the tree)")
if total > 60 * 2**20:
    sys.exit("download_wheels.sh: the wheels leave too little of the 64 MiB for the working tree")
EOF
