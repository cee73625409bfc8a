"""Data: the embedded stdlib corpus, tokenizers, and the tf.data input pipeline.

The trainer uses `make_tokenizer`, `make_input`, `eval_batches` and `Input`
(see pipeline.py for the sources and the pipeline's steps).
"""

import os

# Quiet TensorFlow (only a reader here) before it is first imported. oneDNN
# only speeds up TF's float math, which the input pipeline does not use; with
# it on, TF logs a banner that TF_CPP_MIN_LOG_LEVEL does not silence.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

# pylint: disable=g-import-not-at-top,wrong-import-position
from sparse_lm.data.pipeline import Input
from sparse_lm.data.pipeline import Tokenizer
from sparse_lm.data.pipeline import check_tokenizer
from sparse_lm.data.pipeline import eval_batches
from sparse_lm.data.pipeline import make_input
from sparse_lm.data.pipeline import make_tokenizer

__all__ = ["Input", "Tokenizer", "check_tokenizer", "eval_batches", "make_input", "make_tokenizer"]
