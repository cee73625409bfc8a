"""T5's span corruption (Raffel et al. 2020, section 3.1.4 and 3.3.4), in numpy.

A raw token sequence of `tokens_length` tokens is split into alternating
non-noise and noise spans, starting with non-noise (`random_spans_noise_mask`):

  num_noise_tokens = round(length * noise_density)        (clipped to [1, length - 1])
  num_noise_spans  = round(num_noise_tokens / mean_noise_span_length)   (at least 1)

and the noise tokens and the non-noise tokens are each cut into num_noise_spans
non-empty segments uniformly at random (all masks with those counts are
equally likely). The inputs keep the non-noise tokens and replace each noise
span by one sentinel (`noise_span_to_unique_sentinel`); the targets are each
sentinel followed by the noise span it stands for
(`nonnoise_span_to_unique_sentinel`); both end with EOS:

  tokens   We  hold  these truths  to  be  self evident  that
  inputs   We  hold  <S0>  to  be  <S1>  that  </s>
  targets  <S0>  these truths  <S1>  self evident  </s>      (ends with noise: no final sentinel)

Sentinels are T5's: the last ids of the vocabulary, in decreasing order
(<S0> = vocab_size - 1, <S1> = vocab_size - 2, ...). T5's vocabulary is
32,000 SentencePiece pieces + 100 extra ids, so its sentinels are reserved
ids; seq2seq.py does the same, passing here the tokenizer's size + 100 (or
the top of a tokenizer's own <extra_id_k> tokens).

`random_spans_helper` is T5's: for a desired encoder length it gives the raw
tokens length to read and the decoder (targets) length, EOS included, with
one sentinel per span on each side; (512, 0.15, 3) -> (568, 114).

The rounding is T5's: tf.round (half to even) of float32 products, which
np.round on float32 reproduces. The random segmentation draws from a numpy
Generator seeded per example (T5 uses TF stateless ops seeded per example:
the same distribution, not the same draws).
"""

from __future__ import annotations

import numpy as np

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def _lengths(tokens_length: int, noise_density: float, mean_span: float):
  """(inputs length, targets length) of a full raw chunk, EOS included (T5's
  `_tokens_length_to_inputs_length_targets_length`, one sentinel per span)."""
  num_noise = int(round(tokens_length * noise_density))
  num_spans = int(round(num_noise / mean_span))
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def random_spans_helper(
  inputs_length: int,
  noise_density: float = NOISE_DENSITY,
  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[int, int]:
  """T5's random_spans_helper (t5/data/preprocessors.py), extra tokens per span
  1 and 1: (tokens_length, targets_length), the longest raw chunk whose inputs
  fit `inputs_length`, and its targets length."""
  tokens_length = inputs_length - 1
  while _lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = _lengths(tokens_length, noise_density, mean_noise_span_length)
  if noise_density == 0.5 and targets_length > inputs_length:  # T5's "minor hack"
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def noise_counts(length: int, noise_density: float, mean_noise_span_length: float):
  """(num_noise_tokens, num_noise_spans) of random_spans_noise_mask for a
  sequence of `length` (its degeneracy guards included)."""
  length = max(length, 2)
  num_noise = int(np.round(np.float32(length) * np.float32(noise_density)))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = int(np.round(np.float32(num_noise) / np.float32(mean_noise_span_length)))
  return num_noise, max(num_spans, 1)


def _random_segmentation(num_items: int, num_segments: int, rng) -> np.ndarray:
  """num_items split into num_segments non-empty segments, uniformly: the
  lengths (a shuffle of num_segments - 1 segment starts among num_items - 1 gaps)."""
  first = np.zeros(num_items, np.int64)
  first[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
  return np.bincount(np.cumsum(first), minlength=num_segments)


def random_spans_noise_mask(
  length: int,
  seed,
  noise_density: float = NOISE_DENSITY,
  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> np.ndarray:
  """bool [length]: T5's random_spans_noise_mask (random_roll=False); the
  same mask for the same seed (an int or a sequence of ints)."""
  if noise_density == 0.0:
    return np.zeros(length, bool)
  orig_length, length = length, max(length, 2)
  num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
  rng = np.random.default_rng(seed)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], 1).reshape(-1)
  span_num = np.zeros(length, np.int64)
  np.add.at(span_num, np.cumsum(interleaved)[:-1], 1)
  return (np.cumsum(span_num) % 2 == 1)[:orig_length]


def sentinel_ids(vocab_size: int, n: int) -> np.ndarray:
  """The first n sentinels: vocab_size - 1, vocab_size - 2, ..."""
  return vocab_size - 1 - np.arange(n)


def noise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int) -> np.ndarray:
  """Each run of noise tokens -> one sentinel (decreasing from vocab_size - 1)."""
  tokens, noise_mask = np.asarray(tokens), np.asarray(noise_mask, bool)
  prev = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~prev
  out = np.where(first, vocab_size - np.cumsum(first), tokens).astype(tokens.dtype)
  return out[~(noise_mask & prev)]


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocab_size: int) -> np.ndarray:
  return noise_span_to_unique_sentinel(tokens, ~np.asarray(noise_mask, bool), vocab_size)


def corrupt(
  tokens,
  seed,
  vocab_size: int,
  eos_id: int,
  noise_density: float = NOISE_DENSITY,
  mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of one raw token sequence, each ending with EOS (T5's
  span_corruption: denoise with random_spans_noise_mask, then append_eos)."""
  tokens = np.asarray(tokens, np.int32)
  mask = random_spans_noise_mask(len(tokens), seed, noise_density, mean_noise_span_length)
  eos = np.array([eos_id], np.int32)
  inputs = noise_span_to_unique_sentinel(tokens, mask, vocab_size)
  targets = nonnoise_span_to_unique_sentinel(tokens, mask, vocab_size)
  return np.concatenate([inputs, eos]), np.concatenate([targets, eos])


def uncorrupt(inputs, targets, vocab_size: int) -> np.ndarray:
  """The raw tokens back from (inputs, targets) (both ending with EOS): each
  sentinel of the inputs replaced by what follows the same sentinel in the
  targets. The test of `corrupt`; also readable output for a model's targets."""
  inputs, targets = np.asarray(inputs)[:-1], np.asarray(targets)[:-1]
  spans: list[list[int]] = []
  for t in targets.tolist():  # <S0> span0 <S1> span1 ...: the next sentinel opens a span
    if t == vocab_size - 1 - len(spans):
      spans.append([])
    else:
      spans[-1].append(t)
  out = []
  for t in inputs.tolist():
    k = vocab_size - 1 - t
    out.extend(spans[k] if 0 <= k < len(spans) else [t])
  return np.asarray(out, np.int32)
