"""diffax_lab: diffusion models in JAX/Flax, correct to the equation."""

from setuptools import find_packages, setup

setup(
    name="diffax_lab",
    version="0.1.0",
    description="A JAX/Flax research codebase for diffusion models.",
    packages=find_packages(include=["diffax_lab", "diffax_lab.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.12",
        "flax>=0.12,<0.14",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "ml_collections>=1.0,<2",
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "pillow>=10.1,<13",
        "tqdm>=4.66,<5",
        "safetensors>=0.4,<1",  # weights in and out (U-Net, AutoencoderKL, CLIP, Inception)
        "diffrax>=0.7.2,<0.8",  # the probability-flow ODE's adaptive solvers
    ],
    extras_require={
        "dev": [
            "pytest>=8,<10",
            "pytest-xdist>=3.5,<4",
            "ruff>=0.6,<0.20",
            "import-linter>=2.1,<3",
            # Notebooks (diffax_lab/api.py, notebooks/, `make notebooks`):
            "pandas>=2.1,<4",
            "matplotlib>=3.8,<4",
            "jupytext>=1.16,<2",
            "papermill>=2.6,<3",
            "ipykernel>=6.29,<8",
            "nbconvert>=7.16,<8",
        ],
        "tfds": ["tensorflow-datasets>=4.9,<5", "tensorflow-cpu>=2.16,<3"],
        "tensorboard": ["tensorboardX>=2.6,<3"],
        # The PyTorch peer of benchmarks/diffusers_peer.py (and its test). Install torch first
        # (`pip install torch==2.13.0` takes the CPU build; GPU images bring their own).
        "peer": ["torch>=2.4,<3", "diffusers>=0.35,<0.43"],
        # CLIP: the tokenizer (transformers' CLIPTokenizerFast), safetensors weights, and hub
        # downloads when online. The tests also use transformers' PyTorch CLIPModel (+ torch).
        "clip": ["transformers>=4.45,<6", "safetensors>=0.4,<1", "huggingface_hub>=0.24,<2"],
        # The tests beyond the peer and clip extras: torchmetrics' CLIP score (parity).
        "test": [
            "torchmetrics>=1.7,<2",
            # tests/test_notebooks.py and tests/test_api.py:
            "pandas>=2.1,<4",
            "matplotlib>=3.8,<4",
            "jupytext>=1.16,<2",
            "papermill>=2.6,<3",
            "ipykernel>=6.29,<8",  # the kernel papermill starts (make notebooks' path)
        ],
        # The notebook API alone (diffax_lab/api.py: DataFrames and inline grids).
        "notebooks": ["pandas>=2.1,<4", "matplotlib>=3.8,<4"],
    },
)
