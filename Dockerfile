# The zeroseg image: CUDA PyTorch with zeroseg installed (its configs and the nightly runner inside the package;
# the Kubernetes CronJob in workflows/k8s runs `python -m zeroseg nightly`), run as the non-root user zeroseg
# (uid 1000, which the CronJob's securityContext names).
#
#   docker build -t registry.example.com/zeroseg:0.1.0 .      # tag = the version in pyproject.toml
#   docker run --gpus all --shm-size 16g -v /data:/data registry.example.com/zeroseg:0.1.0 \
#       zs-cache build /data/imagenet/train --store /data/zs-store
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 HF_HOME=/data/hf-cache
WORKDIR /opt/zeroseg
RUN useradd --create-home --uid 1000 --user-group zeroseg

# The dependencies in a layer of their own, listed from pyproject.toml alone, so a code change does not
# reinstall them; torch and torchvision are the image's own CUDA builds, which satisfy pyproject's pins.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > requirements.txt \
    && pip install -r requirements.txt && rm requirements.txt

# The package: every folder pyproject.toml maps to a package (configs/ is zeroseg.configs, workflows/
# zeroseg.workflows), then the install.
COPY README.md ./
COPY src ./src
COPY pipeline ./pipeline
COPY trainer ./trainer
COPY evaluation ./evaluation
COPY configs ./configs
COPY workflows ./workflows
RUN pip install --no-deps . && python -m zeroseg --help >/dev/null

USER zeroseg
CMD ["python", "-m", "zeroseg", "--help"]
