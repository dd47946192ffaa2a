# scgpt on CUDA: the project with its gpu (flash-attn), deepspeed and wandb extras; `scgpt-train` as entry point.
#
#   docker build --build-arg CUDA_ARCH=9.0 -t scgpt .        # 8.0 A100, 8.6 A40/RTX 30xx, 8.9 L40S, 9.0 H100
#   docker run --gpus all -v $PWD/runs:/work/runs scgpt model=small trainer=gpu
#
# flash-attn and DeepSpeed's ops are compiled for CUDA_ARCH only (a fat build takes hours). Under SLURM run
# the image with Pyxis/Enroot or Apptainer: see slurm/README.md.
ARG CUDA_VERSION=12.4.1
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-ubuntu22.04

ARG CUDA_ARCH=9.0
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG MAX_JOBS=8

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TORCH_CUDA_ARCH_LIST=${CUDA_ARCH} \
    FLASH_ATTN_CUDA_ARCHS=${CUDA_ARCH} \
    MAX_JOBS=${MAX_JOBS} \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git ninja-build build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip wheel setuptools packaging ninja

# The CUDA build of torch first: flash-attn and DeepSpeed compile against it (hence --no-build-isolation).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /opt/scgpt
COPY pyproject.toml README.md ./
COPY scgpt ./scgpt
COPY data_modules ./data_modules
COPY conf ./conf
RUN pip install --no-build-isolation ".[gpu,deepspeed,wandb]" \
    && python -c "import scgpt, deepspeed, flash_attn, wandb; print('scgpt image ok')"

WORKDIR /work
ENTRYPOINT ["scgpt-train"]
