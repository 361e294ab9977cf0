# docker build -t patch-diffusion .
# docker run --gpus all -it --rm -v $PWD:/workspace -w /workspace patch-diffusion \
#     torchrun --standalone --nproc_per_node=1 train.py --outdir=training-runs --data=datasets/x.zip
FROM pytorch/pytorch:2.4.1-cuda12.1-cudnn9-runtime

WORKDIR /opt/patch-diffusion
COPY pyproject.toml README.md ./
COPY dnnlib dnnlib
COPY torch_utils torch_utils
COPY training training
COPY train.py generate.py fid.py dataset_tool.py ./
RUN pip install --no-cache-dir -e ".[latent]"

WORKDIR /workspace
