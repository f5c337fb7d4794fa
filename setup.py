from setuptools import find_packages, setup

setup(
    name="phi3_jax",
    version="0.1.0",
    description="JAX research codebase for the Phi-3 family of small language models",
    python_requires=">=3.12",
    packages=find_packages(include=["phi3_jax", "phi3_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "safetensors>=0.4",
        "numpy>=1.26",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "sentencepiece>=0.2",
        "protobuf>=4.21",  # SentencePiece's model proto (the tokenizer.json conversion)
        "tokenizers>=0.20",
        "tiktoken>=0.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch>=2.4", "transformers>=4.48", "tensorflow-datasets>=4.9.10",
                 "array-record>=0.5", "libtpu>=0.0.50"],
        "tpu": ["jax[tpu]>=0.11.2"],
        "gpu": ["jax[cuda12]>=0.11.2"],
        "export": ["gguf>=0.10"],
        "tfds": ["tensorflow-datasets>=4.9.10", "array-record>=0.5"],
    },
)
