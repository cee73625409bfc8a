"""A multilingual translation task built offline from Django's message catalogues.

Django's wheel ships, for about 100 locales, a gettext catalogue per app
(django/conf/locale/<lang>/LC_MESSAGES/django.po and djangojs.po, and
django/contrib/<app>/locale/<lang>/LC_MESSAGES/*.po): each entry is one
English message (msgid) and its human translation (msgstr), made by Django's
translation teams on Transifex. Django is BSD-3-Clause licensed (its
catalogues with it: "This file is distributed under the same license as the
Django package"). `pip install sparse_lm[translation]` (or the test extra)
installs the pinned Django; nothing is downloaded at preparation time.

Parsing (`parse_po`, the stdlib only): the header (msgid "") is skipped, and
so are fuzzy entries (`#, fuzzy`), obsolete ones (`#~`) and untranslated
ones (empty msgstr). A plural entry gives one pair, msgid -> msgstr[0] (the
first plural form: the singular in most languages, the only form in those
with nplurals=1); msgid_plural is not used, since the other forms follow
each language's own plural rule. msgctxt is kept with the entry; format
placeholders (%(name)s, {0}, %d) stay in the text as they are.

Pairs (`PoTranslation`, a TFDS builder over the files on the machine, as
stdlib_corpus.py is): English -> X and X -> English for every language X
(English variants, en_*, are not languages here), and X -> Y through the
English pivot (the same msgctxt and msgid translated in both) among the
languages of XY_LANGUAGES present, deduplicated on (src_lang, tgt_lang,
source, target). Splits are by message: the English msgid's crc32 % 100 < 5
is "validation", < 10 "test", the rest "train", and every pair made from a
message goes where its msgid does (a duplicate pair made from another
message is dropped), so no message and no pair is in two splits.

Groups: a language is high-resource when it has at least HIGH_RESOURCE_PAIRS
English -> X training pairs (the table in README.md: `python -m
sparse_lm.data.translation --table`), low-resource otherwise.

`score(hypotheses, references)` gives corpus chrF, chrF++ and BLEU with
sacrebleu (Post 2018), offline: its default 13a tokenizer, "zh" for Chinese
targets (sacrebleu's Japanese and FLORES tokenizers need extra packages or
downloads, so Japanese BLEU is on 13a tokens and chrF is the metric to read).
"""

from __future__ import annotations

import argparse
import collections
import glob
import importlib.util
import json
import os
import re
import zlib

from etils import epath
import filelock
import ml_collections
import tensorflow_datasets as tfds

NAME = "po_translation"
ENGLISH = "en"
# X -> Y pairs (through the English pivot) among these, where present: widely
# translated languages of several scripts.
XY_LANGUAGES = ("de", "es", "fr", "ja", "ru", "zh_Hans")
HIGH_RESOURCE_PAIRS = 700
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}


# ------------------------------------------------------------------ .po files


def _unquote(s: str) -> str:
  s = s.strip()
  if not (len(s) >= 2 and s[0] == s[-1] == '"'):
    raise ValueError(f"not a quoted string: {s!r}")
  return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), s[1:-1])


def parse_po(path: str) -> list[tuple[str, str, str]]:
  """(msgctxt, msgid, msgstr) of the translated, non-fuzzy entries of a .po file
  (msgstr[0] for plural entries; module docstring)."""
  out = []
  entry: dict[str, str] = {}
  flags = ""
  field = None

  def flush():
    msgid, msgstr = entry.get("msgid", ""), entry.get("msgstr", entry.get("msgstr[0]", ""))
    if msgid and msgstr and "fuzzy" not in flags:
      out.append((entry.get("msgctxt", ""), msgid, msgstr))

  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#~"):
        continue
      if line.startswith("#"):
        if field is not None:  # a comment starts the next entry
          flush()
          entry, flags, field = {}, "", None
        if line.startswith("#,"):
          flags += line[2:]
        continue
      if line.startswith('"'):
        if field is not None:
          entry[field] += _unquote(line)
        continue
      key, _, rest = line.partition(" ")
      if key in ("msgctxt", "msgid") and field not in (None, "msgctxt"):
        flush()  # an entry without comments before it
        entry, flags = {}, ""
      field = key
      entry[key] = _unquote(rest)
  if field is not None:
    flush()
  return out


def django_dir() -> str:
  spec = importlib.util.find_spec("django")
  if spec is None or not spec.origin:
    raise RuntimeError(
      "the translation task reads Django's message catalogues: pip install "
      "'sparse_lm[translation]' (or Django>=5.1,<6)"
    )
  return os.path.dirname(spec.origin)


def django_version() -> str:
  import django  # pylint: disable=g-import-not-at-top

  return django.__version__


def catalogues(root: str | None = None) -> dict[str, list[str]]:
  """{language: [.po files]} of Django's locales (English variants left out)."""
  root = root or django_dir()
  out = collections.defaultdict(list)
  pattern = os.path.join(root, "**", "locale", "*", "LC_MESSAGES", "*.po")
  for p in sorted(glob.glob(pattern, recursive=True)):
    lang = p.split(os.sep)[-3]
    if lang != ENGLISH and not lang.startswith(ENGLISH + "_"):
      out[lang].append(p)
  return dict(out)


def split_of(msgid: str) -> str:
  h = zlib.crc32(msgid.encode()) % 100
  return "validation" if h < 5 else "test" if h < 10 else "train"


def make_pairs(messages: dict[str, dict[tuple[str, str], list[str]]], xy_languages=XY_LANGUAGES):
  """{split: [pair dict]} from {language: {(msgctxt, msgid): [msgstr, ...]}}:
  en <-> X for every language, X <-> Y among xy_languages, deduplicated, split
  by msgid (module docstring)."""
  keys = sorted({k for m in messages.values() for k in m}, key=lambda k: (k[1], k[0]))
  langs = sorted(messages)
  xy = [g for g in langs if g in xy_languages]
  seen, out = set(), {"train": [], "validation": [], "test": []}

  def add(split, src_lang, tgt_lang, source, target, msgid):
    key = (src_lang, tgt_lang, source, target)
    if key not in seen:
      seen.add(key)
      out[split].append(
        {
          "source": source,
          "target": target,
          "src_lang": src_lang,
          "tgt_lang": tgt_lang,
          "msgid": msgid,
        }
      )

  for ctxt, msgid in keys:
    split = split_of(msgid)
    for g in langs:
      for t in messages[g].get((ctxt, msgid), ()):
        add(split, ENGLISH, g, msgid, t, msgid)
        add(split, g, ENGLISH, t, msgid, msgid)
    for x in xy:
      for y in xy:
        if x != y:
          for tx in messages[x].get((ctxt, msgid), ()):
            for ty in messages[y].get((ctxt, msgid), ()):
              add(split, x, y, tx, ty, msgid)
  return out


def read_messages(languages=(), root: str | None = None) -> dict:
  """{language: {(msgctxt, msgid): [distinct msgstr]}} of Django's catalogues
  (`languages`: these only; () = all)."""
  cats = catalogues(root)
  missing = sorted(set(languages) - set(cats))
  if missing:
    raise ValueError(f"no Django catalogue for {missing}; there are {sorted(cats)}")
  out = {}
  for lang in languages or sorted(cats):
    m = collections.defaultdict(list)
    for p in cats[lang]:
      for ctxt, msgid, msgstr in parse_po(p):
        if msgstr not in m[(ctxt, msgid)]:
          m[(ctxt, msgid)].append(msgstr)
    out[lang] = dict(m)
  return out


# ------------------------------------------------------------------ TFDS


def config_name(languages=()) -> str:
  base = f"django{django_version()}"
  return base + ("_" + "-".join(sorted(languages)) if languages else "")


class PoTranslation(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Django's message catalogues as translation pairs (module docstring).

  The config is named after the Django version (and the languages, when not
  all): another Django prepares its own copy."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "en<->X and X<->Y pairs from Django's .po files, split by msgid."}

  def __init__(self, *, languages=(), **kwargs):
    self.languages = tuple(sorted(languages))
    config = tfds.core.BuilderConfig(
      name=config_name(self.languages), description=f"Django {django_version()} catalogues"
    )
    super().__init__(config=config, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # (see stdlib_corpus.PythonStdlib)
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {k: text() for k in ("source", "target", "src_lang", "tgt_lang", "msgid")}
      ),
      supervised_keys=None,
      homepage="https://docs.djangoproject.com/en/stable/topics/i18n/",
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    pairs = make_pairs(read_messages(self.languages))
    counts = {}
    for split, ps in pairs.items():
      c = collections.Counter(f"{p['src_lang']}-{p['tgt_lang']}" for p in ps)
      counts[split] = dict(sorted(c.items()))
    self.info.metadata["pairs"] = counts
    self.info.metadata["languages"] = sorted(
      {p["src_lang"] for ps in pairs.values() for p in ps} - {ENGLISH}
    ) + [ENGLISH]
    self.info.metadata["django"] = django_version()
    return {split: self._generate_examples(ps) for split, ps in pairs.items()}

  def _generate_examples(self, pairs):
    for i, p in enumerate(pairs):
      yield i, p


def builder(data_cfg) -> PoTranslation:
  """The prepared builder of data.languages, prepared on first use into the
  TFDS data dir (data.data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets,
  as pipeline.data_dir), under pipeline.py's preparation lock file."""
  d = os.path.expanduser(
    data_cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  )
  os.makedirs(d, exist_ok=True)
  with filelock.FileLock(os.path.join(d, ".sparse_lm_prepare.lock")):
    b = PoTranslation(languages=tuple(data_cfg.languages), data_dir=d)
    if not b.is_prepared():
      b.download_and_prepare()
  return b


_CACHE: dict = {}


def read_split(data_cfg, split: str) -> list[dict]:
  """The pairs of a split ("train", "validation", "test") as dicts of str."""
  b = builder(data_cfg)
  key = (b.data_dir, split)
  if key not in _CACHE:
    if split not in b.info.splits:
      raise ValueError(f"config.data.eval_split={split!r}: {NAME} has {list(b.info.splits)}")
    ds = b.as_dataset(split=split, shuffle_files=False)
    _CACHE[key] = [{k: v.decode() for k, v in ex.items()} for ex in tfds.as_numpy(ds)]
  return _CACHE[key]


def languages(data_cfg) -> list[str]:
  return list(builder(data_cfg).info.metadata["languages"])


def groups(pair_counts: dict[str, int]) -> dict[str, str]:
  """{language: "high" | "low"} from English -> X training pair counts."""
  out = {}
  for k, n in pair_counts.items():
    src, tgt = k.split("-", 1)
    if src == ENGLISH:
      out[tgt] = "high" if n >= HIGH_RESOURCE_PAIRS else "low"
  return out


def table(b: PoTranslation) -> str:
  """README's table: pairs per language and split, and its resource group."""
  pc = b.info.metadata["pairs"]
  grp = groups(pc["train"])
  rows = [
    "| language | en->X train | X->en train | en->X validation | en->X test | group |",
    "|---|---:|---:|---:|---:|---|",
  ]
  for g in sorted(grp, key=lambda g: (-pc["train"].get(f"en-{g}", 0), g)):
    rows.append(
      f"| {g} | {pc['train'].get(f'en-{g}', 0)} | {pc['train'].get(f'{g}-en', 0)} "
      f"| {pc['validation'].get(f'en-{g}', 0)} | {pc['test'].get(f'en-{g}', 0)} | {grp[g]} |"
    )
  total = {s: sum(c.values()) for s, c in pc.items()}
  n_high = sum(v == "high" for v in grp.values())
  rows.append("")
  rows.append(
    f"{len(grp)} languages ({n_high} high-resource: >= {HIGH_RESOURCE_PAIRS} en->X training "
    f"pairs), Django {b.info.metadata['django']}; pairs in all (en<->X and X<->Y among "
    f"{', '.join(XY_LANGUAGES)}): train {total['train']}, validation {total['validation']}, "
    f"test {total['test']}."
  )
  return "\n".join(rows)


# ------------------------------------------------------------------ metrics


def score(hypotheses: list[str], references, tgt_lang: str = "") -> dict[str, float]:
  """Corpus chrF (chrF2), chrF++ and BLEU (sacrebleu) of hypotheses against
  references: a list of strings, or a list of reference streams (each a list
  as long as hypotheses), as sacrebleu takes them."""
  import sacrebleu  # pylint: disable=g-import-not-at-top

  refs = [references] if references and isinstance(references[0], str) else list(references)
  tokenize = "zh" if tgt_lang.startswith("zh") else "13a"
  return {
    "chrf": sacrebleu.corpus_chrf(hypotheses, refs).score,
    "chrf++": sacrebleu.corpus_chrf(hypotheses, refs, word_order=2).score,
    "bleu": sacrebleu.corpus_bleu(hypotheses, refs, tokenize=tokenize).score,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--table", action="store_true", help="print README's table of pair counts")
  p.add_argument("--data_dir", default="", help="TFDS data dir (default as data.data_dir)")
  p.add_argument("--languages", default="", help="comma-separated; default all")
  a = p.parse_args(argv)
  langs = tuple(g for g in a.languages.split(",") if g)
  b = builder(ml_collections.ConfigDict({"data_dir": a.data_dir, "languages": langs}))
  if a.table:
    print(table(b))
  else:
    print(json.dumps(b.info.metadata["pairs"], indent=1))


if __name__ == "__main__":
  # Through the package: TFDS locates a builder by its class's module, not __main__.
  from sparse_lm.data import translation as _translation  # pylint: disable=g-import-self

  _translation.main()
