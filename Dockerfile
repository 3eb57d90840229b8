# eyeray's cluster image: the official Ray GPU image of the Ray version eyeray pins
# (pyproject.toml: ray==2.60.*; the image's Ray must equal the Ray of whoever runs `ray up` or
# `ray job submit`), plus eyeray with the GPU build of TensorFlow. Not rayproject/ray-ml: that
# image is deprecated and brings PyTorch and friends eyeray does not use.
#
#   docker build -t registry.example.com/eyeray/eyeray:0.1.0-ray2.60.0-gpu .      # CHANGE: your registry
#   docker push registry.example.com/eyeray/eyeray:0.1.0-ray2.60.0-gpu
#
# The tag is referenced by cluster.yaml and deploy/k8s/*.yaml (tests/test_cluster.py checks they
# agree). TensorFlow brings its own CUDA libraries as pip wheels (tensorflow[and-cuda]); the host
# only needs a recent NVIDIA driver (the AWS Deep Learning Base AMIs and GPU node images of EKS,
# GKE and AKS have one).
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/eyeray

# Dependencies first, in their own layer: it changes only when pyproject.toml does, and it is the
# large one (TensorFlow and its CUDA wheels, about 3 GB). A stub package lets pip resolve the
# project's dependencies before its code is copied. boto3 is for the cluster launcher: the
# autoscaler on the head node starts EC2 workers with it.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir eyeray && touch eyeray/__init__.py \
    && pip install --no-cache-dir "eyeray[gpu] @ file:///home/ray/eyeray" "boto3>=1.34" \
    && pip uninstall --yes eyeray \
    && rm -rf eyeray build ./*.egg-info

# The code: the package, and the job scripts that `ray job submit` and the RayJobs run
# (python /home/ray/eyeray/jobs/train_oct.py ...).
COPY --chown=ray:users eyeray/ eyeray/
COPY --chown=ray:users jobs/ jobs/
RUN pip install --no-cache-dir --no-deps "eyeray @ file:///home/ray/eyeray" && python -c "import eyeray.cli"

# TensorFlow maps all GPU memory of a device at start; with growth on, several model actors or
# Serve replicas can share one GPU (--gpus-per-actor 0.5, num_gpus: 0.5).
ENV TF_FORCE_GPU_ALLOW_GROWTH=true
