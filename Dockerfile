# The zeroseg image: CUDA PyTorch with zeroseg installed, and the repository's configs/ and workflows/
# at /opt/zeroseg (the Kubernetes CronJob in workflows/k8s runs /opt/zeroseg/workflows/nightly.py).
#
#   docker build -t registry.example.com/zeroseg:0.1.0 .      # tag = the version in pyproject.toml
#   docker run --gpus all --shm-size 16g -v /data:/data registry.example.com/zeroseg:0.1.0 \
#       zs-cache build /data/imagenet/train --store /data/zs-store
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HOME=/data/hf-cache
WORKDIR /opt/zeroseg

# The package first (its layer changes only with the code), on the image's own CUDA torch and torchvision.
COPY pyproject.toml README.md ./
COPY src ./src
COPY pipeline ./pipeline
COPY trainer ./trainer
COPY evaluation ./evaluation
RUN pip install . && python -m zeroseg --help >/dev/null

COPY configs ./configs
COPY workflows ./workflows
CMD ["python", "-m", "zeroseg", "--help"]
