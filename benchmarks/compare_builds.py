"""Before/after: run the same benchmark from two built checkouts in turn and compare rows.

Each checkout must be built in place (``python setup.py build_ext --inplace`` or an
editable install) and is imported through ``PYTHONPATH``, so the two runs use their own
``mod_ext`` (the JSON records each run's build info and git commit). Runs alternate
(before, after, before, after, ...) so both see the same machine load; each row's time is
the median over the rounds. Rows are matched on their non-timing fields.

    python benchmarks/compare_builds.py --before ../old --after . --rounds 3 \\
        --bench "bench_block.py --quick" --bench "bench_decode.py --quick" --json cmp.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

TIME_FIELDS = ("ms", "step_ms")
SKIP_FIELDS = {"speedup", "status", "target", "vs_dense", "overhead", "tokens_per_s", "peak_mib", "gbps",
               "copy_fraction", "speedup_vs_dense", "mod_layer_cache_ratio", "cache_ratio_status"}


def run_once(tree: str, bench: str, out: str) -> dict:
    script, *args = shlex.split(bench)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cmd = [sys.executable, os.path.join(tree, "benchmarks", script), *args, "--json", out]
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {tree}:\n{r.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def row_key(row: dict):
    return tuple(sorted((k, str(v)) for k, v in row.items()
                        if k not in TIME_FIELDS and k not in SKIP_FIELDS and not isinstance(v, float)))


def row_time(row: dict):
    for f in TIME_FIELDS:
        if f in row:
            return row[f]
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="checkout built in place (the baseline)")
    p.add_argument("--after", required=True, help="checkout built in place (the change)")
    p.add_argument("--bench", action="append", required=True,
                   help='a benchmark script in benchmarks/ with its options, e.g. "bench_block.py --quick"')
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="write every run's rows and the comparison here")
    args = p.parse_args()

    report = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after), "benches": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for bench in args.bench:
            times = {"before": {}, "after": {}}
            envs = {}
            for r in range(args.rounds):
                for side, tree in (("before", args.before), ("after", args.after)):
                    data = run_once(tree, bench, os.path.join(tmp, f"{side}{r}.json"))
                    envs[side] = {k: data["env"].get(k) for k in ("git_commit", "mod_ext_build", "load_avg_1min")}
                    for row in data["results"]:
                        t = row_time(row)
                        if t is not None:
                            times[side].setdefault(row_key(row), []).append(t)
            rows = []
            print(f"\n## {bench}  (median of {args.rounds} alternating runs; before {envs['before']['git_commit']}, "
                  f"after {envs['after']['git_commit']})\n")
            print("| row | before ms | after ms | after / before |")
            print("|---|---:|---:|---:|")
            for key, tb in times["before"].items():
                ta = times["after"].get(key)
                if not ta:
                    continue
                b, a = statistics.median(tb), statistics.median(ta)
                label = ", ".join(f"{k}={v}" for k, v in key if v not in ("None", "-"))
                rows.append(dict(row=label, before_ms=b, after_ms=a, ratio=a / b))
                print(f"| {label} | {b:.3f} | {a:.3f} | {a / b:.2f} |")
            unmatched = [k for k in times["after"] if k not in times["before"]]
            if unmatched:
                print(f"\n({len(unmatched)} rows of the after run have no counterpart in the before run)")
            report["benches"][bench] = dict(env=envs, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
