# A GPU image that serves the detector on port 5000 and can also train. Its build is not checked here
# (no Docker engine on our machines); keep it in step with setup.py.
#   docker build -t deepfake-gan .
#   docker run --gpus all -p 5000:5000 -v $PWD/runs:/app/runs deepfake-gan \
#       python -m pipeline.app --host 0.0.0.0 --device cuda --checkpoint runs/dcgan-10ep/checkpoints/step-00012710.pt
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/runs:/app/runs deepfake-gan \
#       torchrun --nproc_per_node=8 launch/train.py --config configs/dcgan-10ep.yaml data.shards=/data/shards/celeba
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ffmpeg \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN python3 -m venv $VIRTUAL_ENV
WORKDIR /app
COPY setup.py README.md ./
COPY pipeline pipeline
COPY shards shards
RUN pip install --no-cache-dir .
COPY launch launch
COPY configs configs
EXPOSE 5000
CMD ["python", "-m", "pipeline.app", "--host", "0.0.0.0", "--device", "cuda", "--checkpoint", "/app/runs/model.pt"]
