# An image of this repository: Python 3.11 and torch 2.13.0, the versions the test suite ran with
# (docs/INSTALL.md, "Requirements"), and the project installed with its dev and latent extras, as
# `make test` installs it. PyPI's Linux torch wheel brings its own CUDA libraries, so the same image
# runs on CPU and, with --gpus all, on NVIDIA GPUs (the host needs only the driver).
#
#   docker build -t patch-diffusion .
#   docker run --rm patch-diffusion                    # the test suite (make test), CPU
#   docker run --rm patch-diffusion make demo          # the CPU demo (about 8 minutes on 2 cores)
#   docker run --rm -v $PWD:/workspace -w /workspace patch-diffusion make test     # a checkout of yours
#   docker run --gpus all --rm -v $PWD:/workspace -w /workspace patch-diffusion \
#       torchrun --standalone --nproc_per_node=1 train.py --outdir=training-runs --data=datasets/x.zip
#
# VENV=none makes the Makefile use this environment as it is, so a bind-mounted checkout builds no
# second one. tests/test_packaging.py checks these steps against pyproject.toml and the Makefile.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*

# torch first, pinned as the Makefile pins it (pyproject.toml's open range would take the newest).
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "$TORCH_SPEC"

WORKDIR /opt/patch-diffusion
COPY pyproject.toml README.md LICENSE Makefile ./
COPY train.py generate.py fid.py dataset_tool.py reconstruct_phema.py ./
COPY dataset_prep dataset_prep
COPY dnnlib dnnlib
COPY evaluation evaluation
COPY torch_utils torch_utils
COPY training training
COPY benchmarks benchmarks
COPY tests tests
COPY docs docs
COPY .ci .ci
RUN pip install --no-cache-dir -e ".[dev,latent]"

ENV VENV=none PYTHON=python
CMD ["make", "test"]
