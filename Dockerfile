# gradcycle on CUDA machines: the project and its pinned stack on PyTorch's CUDA runtime image.
#
#   docker build -t gradcycle .
#   docker run --gpus all --ipc=host --rm -v "$PWD/outputs:/workspace/gradcycle/outputs" \
#       gradcycle torchrun --standalone --nproc_per_node 8 train.py backend=fsdp
#
# The base image carries the torch build the project pins (torch==2.13.0, CUDA 12.6), so pip keeps
# it and installs only the rest. DeepSpeed's JIT-compiled ops (fused Adam, CPU Adam) need nvcc:
# build with --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel for those.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

# expandable_segments: fewer fragmentation OOMs when micro-batch shapes vary (ragged data, eval).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

# libaio: DeepSpeed's async_io op (NVMe offload, backend.offload_device=nvme) builds against it,
# JIT at first use (with the -devel base image's compiler) or prebuilt with DS_BUILD_AIO=1.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libaio-dev \
    && rm -rf /var/lib/apt/lists/*

# An unprivileged user owns the working tree (outputs/, caches); nothing runs as root.
RUN useradd --create-home --uid 1000 --shell /bin/bash gradcycle \
    && install -d -o gradcycle -g gradcycle /workspace/gradcycle
WORKDIR /workspace/gradcycle

# The dependency layer first, from pyproject.toml and constraints.txt alone: editing the source
# does not reinstall it. The core dependencies are everything every backend needs at run time
# (accelerate included: ZeRO-3's model build); constraints.txt pins the versions the suite ran with.
COPY pyproject.toml constraints.txt ./
# DL3013 (pin pip versions): the versions are pinned in constraints.txt, which this installs with.
# hadolint ignore=DL3013
RUN mkdir -p src/gradcycle \
    && touch src/gradcycle/__init__.py \
    && pip install --no-cache-dir -c constraints.txt ".[slurm]" \
    && pip uninstall -y gradcycle \
    && rm -rf src build

COPY --chown=gradcycle:gradcycle src ./src
COPY --chown=gradcycle:gradcycle conf ./conf
COPY --chown=gradcycle:gradcycle train.py ./
COPY --chown=gradcycle:gradcycle launch ./launch
COPY --chown=gradcycle:gradcycle bench ./bench
RUN pip install --no-cache-dir --no-deps -e . \
    && chown -R gradcycle:gradcycle src

USER 1000:1000
# Sanity at build time: the package imports and the config composes (no GPU needed).
RUN python -c "from gradcycle.cli import compose; compose(['backend=fsdp'])"
CMD ["python", "train.py", "--help"]
