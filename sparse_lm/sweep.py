r"""Sweeps: a grid of runs from one config file, run, resumed and collected.

  python -m sparse_lm.sweep --config=configs/sweeps/dense_lr.py --workdir=runs/dense_lr
  python -m sparse_lm.sweep ... --parallel=2         # two points at a time
  python -m sparse_lm.sweep ... --print_commands     # one command per point, for a scheduler
  python -m sparse_lm.sweep ... --collect_only       # just rebuild results.csv / results.json

A sweep file is a config file (big_vision style): `get_config(arg)` gives the
base config and `sweep(add)` calls `add(**{"model.moe.num_experts": 8, ...})`
once per point (`sweep(add, arg)` gets the variant too, for a file with
several grids). Each point runs `python -m sparse_lm.main` in its own
subfolder named from its overrides; a finished point (DONE file) is skipped, an
interrupted one resumes from its checkpoints. Results go to runs.csv (one row
per run), results.csv (one row per point: runs that differ only in
`train.seed` are averaged, with a standard deviation and n) and results.json.
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

from sparse_lm import cli
from sparse_lm import config as cfglib
from sparse_lm import metrics as metricslib
from sparse_lm.errors import ConfigError
from sparse_lm.errors import UserError

_CONFIG = flags.DEFINE_string("config", None, "Sweep file (path[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder of the sweep; one subfolder per point.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run at the same time.")
_PRINT = flags.DEFINE_bool("print_commands", False, "Print one command per point and exit.")
_COLLECT = flags.DEFINE_bool("collect_only", False, "Only collect results of finished points.")
_TARGET = flags.DEFINE_float(
  "target_loss",
  None,
  "Eval loss for 'steps/tokens to target' (default: the sweep file's TARGET_LOSS, else none).",
)


# ------------------------------------------------------------------ loading


def points(sweep_file: str) -> list[dict]:
  """The grid: a list of {dotted.key: value} overrides, validated against the base."""
  path, _, arg = sweep_file.partition(":")
  mod = cfglib.load_module(path)
  if not hasattr(mod, "sweep"):
    raise ConfigError(f"--config={sweep_file}: a sweep file needs a sweep(add) function")
  out = []
  add = lambda **kv: out.append({k.removeprefix("config."): v for k, v in kv.items()})
  # sweep(add, arg) when the grid depends on the variant, else sweep(add).
  if len(inspect.signature(mod.sweep).parameters) > 1:
    mod.sweep(add, arg)
  else:
    mod.sweep(add)
  for p in out:  # a fresh base per point keeps its field references live
    cfglib.validate(apply_overrides(mod.get_config(arg) if arg else mod.get_config(), p))
  names = [point_name(p) for p in out]
  if len(set(names)) != len(names):
    raise ConfigError(f"--config={sweep_file}: sweep(add) gives the same point twice")
  return out


def apply_overrides(c, overrides: dict):
  """Sets dotted keys in config `c` (in place); unknown keys are a ConfigError."""
  for key, value in overrides.items():
    node, *path = [c] + key.split(".")
    for part in path[:-1]:
      if part not in node:
        raise ConfigError(f"sweep override {key}={value!r}: config has no key {key!r}")
      node = node[part]
    if path[-1] not in node:
      raise ConfigError(f"sweep override {key}={value!r}: config has no key {key!r}")
    node[path[-1]] = value
  return c


def point_name(overrides: dict) -> str:
  """{"model.moe.num_experts": 8, "train.learning_rate": 0.001}
  -> "num_experts=8,learning_rate=0.001"."""
  if not overrides:
    return "base"
  parts = []
  for k, v in overrides.items():
    v = str(v).replace("/", "_").replace(" ", "")
    parts.append(f"{k.split('.')[-1]}={v}")
  return ",".join(parts)


def command(sweep_file: str, workdir: str, overrides: dict) -> list[str]:
  args = [
    sys.executable,
    "-m",
    "sparse_lm.main",
    f"--config={sweep_file}",
    f"--workdir={os.path.join(workdir, point_name(overrides))}",
  ]
  return args + [f"--config.{k}={v}" for k, v in overrides.items()]


# ------------------------------------------------------------------ running


def _progress(point_dir: str) -> str:
  rows = metricslib.read_jsonl(os.path.join(point_dir, "metrics.jsonl"))
  steps = [r for r in rows if "train_loss" in r]
  if not steps:
    return "starting"
  last = steps[-1]
  evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
  return f"step {last['step']}, loss {last['train_loss']:.3f}" + (
    f", eval {evals[-1]:.3f}" if evals else ""
  )


def _die_with_parent():
  """In the child, before exec: SIGTERM it when the sweep dies (even by
  SIGKILL), so a killed sweep leaves no point training on; SIGTERM makes the
  trainer save a checkpoint and exit (Linux prctl PR_SET_PDEATHSIG)."""
  if sys.platform.startswith("linux"):
    import ctypes  # pylint: disable=g-import-not-at-top

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _last_line(path: str) -> str:
  with open(path, errors="replace") as f:
    lines = [l.strip() for l in f if l.strip()]
  return lines[-1][:300] if lines else ""


def run_all(sweep_file: str, workdir: str, parallel: int = 1, log=print, done=None) -> list[str]:
  """Runs every unfinished point (`parallel` at a time); returns the failed points' names.
  A point is finished when its folder holds DONE, or where `done(folder)` says so (a
  study that keeps its finished runs' results elsewhere)."""
  grid = points(sweep_file)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir {workdir} is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir {workdir} cannot be created: {e.strerror or e}") from None
  finished = lambda d: os.path.exists(os.path.join(d, "DONE")) or (done is not None and done(d))
  todo = [p for p in grid if not finished(os.path.join(workdir, point_name(p)))]
  log(
    f"sweep {sweep_file}: {len(grid)} points, {len(grid) - len(todo)} done, "
    f"{len(todo)} to run ({parallel} at a time) in {workdir}"
  )
  running: dict = {}
  failed = []
  t_print = 0.0
  while todo or running:
    while todo and len(running) < parallel:
      p = todo.pop(0)
      d = os.path.join(workdir, point_name(p))
      os.makedirs(d, exist_ok=True)
      logf = open(os.path.join(d, "log.txt"), "a")
      idx = grid.index(p) + 1
      log(
        f"[{idx}/{len(grid)}] {point_name(p)}: start"
        + (" (resuming)" if os.path.exists(os.path.join(d, "checkpoints")) else "")
      )
      running[idx] = (
        p,
        d,
        subprocess.Popen(
          command(sweep_file, workdir, p),
          stdout=logf,
          stderr=subprocess.STDOUT,
          preexec_fn=_die_with_parent,
        ),
        logf,
        time.time(),
      )
    for idx, (p, d, proc, logf, t0) in list(running.items()):
      rc = proc.poll()
      if rc is None:
        continue
      logf.close()
      del running[idx]
      wall = time.time() - t0
      if rc == 0:
        with open(os.path.join(d, "DONE"), "w") as f:
          f.write(json.dumps({"overrides": p}))
        log(f"[{idx}/{len(grid)}] {point_name(p)}: done in {wall:.0f}s ({_progress(d)})")
      else:
        failed.append(point_name(p))
        log(
          f"[{idx}/{len(grid)}] {point_name(p)}: FAILED (exit {rc}): "
          f"{_last_line(os.path.join(d, 'log.txt'))}; log: {d}/log.txt"
        )
    if running and time.time() - t_print > 30:
      t_print = time.time()
      for idx, (p, d, *_) in running.items():
        log(f"[{idx}/{len(grid)}] {point_name(p)}: {_progress(d)}")
    time.sleep(0.5)
  if failed:
    log(f"{len(failed)} point(s) failed: {', '.join(failed)}")
  return failed


# ----------------------------------------------------------------- results


def summarize_point(d: str, target_loss: float | None = None) -> dict:
  """Final/best eval loss, steps and tokens to a target, speed, size, wall time."""
  rows = metricslib.read_jsonl(os.path.join(d, "metrics.jsonl"))
  evals = [r for r in rows if "eval_loss" in r]
  train = [r for r in rows if "tokens_per_s" in r]
  head = next((r for r in rows if "total_params" in r), {})
  out = {
    "final_step": max((r["step"] for r in rows), default=0),
    "final_eval_loss": evals[-1]["eval_loss"] if evals else math.nan,
    "best_eval_loss": min((r["eval_loss"] for r in evals), default=math.nan),
    "tokens_per_s": _median(
      [r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]
    ),
    "total_params": head.get("total_params"),
    "active_params": head.get("active_params"),
    "train_flops_per_token": head.get("train_flops_per_token"),
    "steps_to_target": None,
    "tokens_to_target": None,
  }
  if target_loss is not None:
    hit = next((r for r in evals if r["eval_loss"] <= target_loss), None)
    if hit:
      out["steps_to_target"] = hit["step"]
      out["tokens_to_target"] = hit.get("tokens")
  wall = os.path.join(d, "wall_time.json")
  out["wall_time_s"] = json.load(open(wall))["seconds"] if os.path.exists(wall) else None
  out["done"] = os.path.exists(os.path.join(d, "DONE"))
  return out


def _median(xs):
  xs = sorted(xs)
  return xs[len(xs) // 2] if xs else math.nan


SEED_KEY = "train.seed"
# Per-run numbers that results.csv averages over seeds (mean, and {key}_std).
SEED_AVERAGED = (
  "final_eval_loss",
  "best_eval_loss",
  "steps_to_target",
  "tokens_to_target",
  "tokens_per_s",
  "wall_time_s",
)


def aggregate_seeds(runs: list[dict]) -> list[dict]:
  """One row per point with `train.seed` left out of its overrides: the mean of
  each SEED_AVERAGED number over that point's seeds, its sample standard
  deviation ({key}_std, ddof 1; 0 for one seed), `n` and `seeds`. A seed
  changes model init and data order together (both derive from train.seed)."""
  groups: dict[str, list[dict]] = {}
  for r in runs:
    overrides = {k: v for k, v in r["overrides"].items() if k != SEED_KEY}
    groups.setdefault(point_name(overrides), []).append({**r, "overrides": overrides})
  out = []
  for name, rs in groups.items():
    row = {"point": name, **rs[0]["overrides"]}
    row.update(
      {
        k: v
        for k, v in rs[0].items()
        if k not in ("point", "overrides", SEED_KEY) and k not in rs[0]["overrides"]
      }
    )
    for key in SEED_AVERAGED:
      xs = [r[key] for r in rs if r.get(key) is not None and not math.isnan(float(r[key]))]
      row[key] = xs[0] if len(xs) == 1 else (sum(xs) / len(xs) if xs else None)
      row[f"{key}_std"] = (
        math.sqrt(sum((x - row[key]) ** 2 for x in xs) / (len(xs) - 1))
        if len(xs) > 1
        else (0.0 if xs else None)
      )
    row["n"] = len(rs)
    row["seeds"] = [r["overrides_seed"] for r in rs]
    row["done"] = all(r["done"] for r in rs)
    out.append(row)
  return out


def collect(sweep_file: str, workdir: str, target_loss: float | None = None) -> list[dict]:
  """Writes runs.csv (one row per run), results.csv (one row per point, seeds
  aggregated: aggregate_seeds) and results.json (both); returns the points."""
  path, _, _ = sweep_file.partition(":")
  if target_loss is None:
    target_loss = getattr(cfglib.load_module(path), "TARGET_LOSS", None)
  runs = []
  for p in points(sweep_file):
    d = os.path.join(workdir, point_name(p))
    runs.append(
      {
        "point": point_name(p),
        **p,
        **summarize_point(d, target_loss),
        "overrides": p,
        "overrides_seed": p.get(SEED_KEY, 0),
      }
    )
  results = aggregate_seeds(runs)
  for name, rows in (
    (
      "runs.csv",
      [{k: v for k, v in r.items() if k not in ("overrides", "overrides_seed")} for r in runs],
    ),
    ("results.csv", results),
  ):
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(workdir, name), "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=keys)
      w.writeheader()
      w.writerows(rows)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(
      {
        "sweep": sweep_file,
        "target_loss": target_loss,
        "points": results,
        "runs": [{k: v for k, v in r.items() if k != "overrides_seed"} for r in runs],
      },
      f,
      indent=1,
    )
  return results


def main(argv):
  del argv
  if not _CONFIG.value or not _WORKDIR.value and not _PRINT.value:
    raise app.UsageError("--config and --workdir are required")
  if _PRINT.value:
    for p in points(_CONFIG.value):
      print(" ".join(["python"] + command(_CONFIG.value, _WORKDIR.value or "runs/sweep", p)[1:]))
    return
  failed = [] if _COLLECT.value else run_all(_CONFIG.value, _WORKDIR.value, _PARALLEL.value)
  results = collect(_CONFIG.value, _WORKDIR.value, _TARGET.value)
  print(f"results: {_WORKDIR.value}/results.csv, {_WORKDIR.value}/results.json")
  for r in results:
    if r["final_eval_loss"] is None:
      print(f"  {r['point']:<40} no eval yet")
      continue
    seeds = f" +- {r['final_eval_loss_std']:.4f} (std over {r['n']} seeds)" if r["n"] > 1 else ""
    print(
      f"  {r['point']:<40} final eval {r['final_eval_loss']:.4f}{seeds}  "
      f"best {r['best_eval_loss']:.4f}"
    )
  if failed:
    sys.exit(f"{len(failed)} point(s) failed: {', '.join(failed)}; rerun the same command to retry")


if __name__ == "__main__":
  cli.run(main, "sparse_lm.sweep")  # user errors end as one line (cli.py)
