"""simmim: SimMIM masked-image-modeling pre-training, made fast and practical.

Each top-level folder is one subpackage of the `simmim` namespace package (see DESIGN.md, Layout):
`simmim.pipeline` is `pipeline/`, `simmim.kernels` is `kernels/`, and so on.
"""
from setuptools import setup

SUBPACKAGES = ["core", "kernels", "pipeline", "trainer", "benchmarks", "cli"]

setup(
    name="simmim",
    version="0.1.0",
    description="SimMIM masked-image-modeling pre-training, made fast and practical",
    python_requires=">=3.10",
    packages=[f"simmim.{p}" for p in SUBPACKAGES],
    package_dir={f"simmim.{p}": p for p in SUBPACKAGES},
    package_data={"simmim.trainer": ["configs/*.yaml", "run.sh"]},
    install_requires=[
        "torch>=2.4",
        "torchvision>=0.19",
        "timm>=1.0.31",  # its Swin filter tells our layout from the original by the layer shapes; Beit use_fc_norm
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "matplotlib",
        "tensorboard",  # event files in every run folder (torch.utils.tensorboard writes them)
        "safetensors",  # simmim export
        "scikit-image",  # ships the photographs the sample dataset is built from
        "tifffile",  # multi-channel .tif for data.channels=N (also a dependency of scikit-image)
        "omegaconf>=2.4",  # structured configs (YAML + a.b=c into the dataclasses); 2.4: tuple fields
        "scipy",  # the released relative-position-table resize (FITPACK cubic spline)
    ],
    extras_require={
        # The fast paths; `make setup` installs ffcv and dali (and FFCV's apt build deps), `full` all.
        "triton": ["triton"],
        "ffcv": ["ffcv", "numba", "opencv-python-headless"],
        "dali": ["nvidia-dali-cuda130"],
        # data.backend: stream and run.mirror: s3:// (shards and checkpoints in an object store)
        "stream": ["mosaicml-streaming", "boto3"],
        # wandb: the offline-logging test; scikit-learn: the probe test; moto: a local S3 server for the stream tests
        "test": ["pytest", "psutil", "wandb", "scikit-learn", "moto[server]"],
        "full": ["triton", "ffcv", "numba", "opencv-python-headless", "nvidia-dali-cuda130", "mosaicml-streaming",
                 "boto3", "pytest", "psutil", "scikit-learn", "moto[server]"],
    },
    # the full command, `bench` included, lives at the top of the dependency graph (cli/main.py)
    entry_points={"console_scripts": ["simmim = simmim.cli.main:main"]},
)
