"""sparse_lm: a JAX/Flax research framework for sparse Mixture-of-Experts LMs."""

from setuptools import find_packages
from setuptools import setup

setup(
  name="sparse_lm",
  version="0.1.0",
  description="Sparse Mixture-of-Experts language models in JAX/Flax NNX",
  packages=find_packages(include=["sparse_lm", "sparse_lm.*"]),
  python_requires=">=3.11",
  install_requires=[
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml-collections>=1.1.0,<2",
    "absl-py>=2.1,<3",
    "numpy>=1.26,<3",
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.8,<5",
    "sentencepiece>=0.2.0,<0.3",
    "matplotlib>=3.8,<4",
    "tensorboard>=2.18,<3",
    "filelock>=3.13,<5",
    # Hugging Face checkpoints (sparse_lm/convert.py) and tokenizer.json files.
    "safetensors>=0.4.3,<1",
    "tokenizers>=0.19,<1",
    # Chat templates (sparse_lm/data/chat.py); 3.1.6 closes the sandbox escapes
    # that transformers also refuses older versions for.
    "jinja2>=3.1.6,<4",
    # chrF and BLEU of translations (sparse_lm/data/translation.py).
    "sacrebleu>=2.4,<3",
  ],
  extras_require={
    "test": [
      "pytest>=8,<10",
      "pytest-xdist>=3.5,<4",
      "ruff>=0.17,<0.18",
      "nbclient>=0.10,<0.12",
      "nbformat>=5.10,<6",
      "ipykernel>=6.29,<8",
      "Django>=5.1,<6",  # = the translation extra: the tests prepare a slice of it
    ],
    # The translation task's message catalogues (sparse_lm/data/translation.py):
    # Django's wheel carries them; nothing else of Django is imported.
    "translation": ["Django>=5.1,<6"],
    # Only to regenerate tests/fixtures/hf (make_fixtures.py); CI never needs it.
    "hf_fixtures": [
      "torch>=2.4",
      "transformers>=5.0,<6",
    ],
  },
)
