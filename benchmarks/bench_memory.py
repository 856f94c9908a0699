"""Peak memory of ``adapt`` and the cost of a busy CPU neighbour (issue 14).

``memory``: peak RSS (``wait4`` of a fresh child process) of one ``adapt smollm2 --task hamlet
--max-steps 1`` per method, at the default settings (batch 32 x 128 tokens, CPU micro-batches of
``CPU_MICRO_TOKENS``) and with the whole batch in one pass (``--whole``, the behaviour before issue 14).

``threads``: wall time of ``weightsmith analyze minilm`` idle and beside one process spinning on a core,
with the automatic thread count (``weightsmith.threads``) and with the pool forced to every CPU
(``WEIGHTSMITH_THREADS=<cpus>``, the behaviour before). The machine's load average is recorded with
each run: on a shared machine the numbers mean little without it.

    .venv/bin/python benchmarks/bench_memory.py memory --methods lora,dora --device cpu
    .venv/bin/python benchmarks/bench_memory.py threads --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable
CHILD = """
import json, sys, time
from weightsmith.train import finetune
kw = json.loads(sys.argv[1])
t0 = time.perf_counter()
r = finetune("smollm2", "hamlet", kw.pop("method"), **kw)
print(json.dumps({"wall_s": time.perf_counter() - t0, "train_s": r.train_time_s, "ppl": r.metric,
                  "loss": r.loss_history}))
"""


def _popen_wait4(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str, str]:
    """Run ``cmd``; (wall s, peak RSS GB of that child alone, stdout, stderr)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        p = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        out, err = fo.read(), fe.read()
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed ({p.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 2**20, out, err


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for method in args.methods.split(","):
        for whole in (False, True) if args.whole else (False,):
            kw = {
                "method": method,
                "max_steps": 1,
                "device": args.device,
                "eval_examples": args.eval_examples,
                "micro_batch_tokens": 10**9 if whole else None,
            }
            load = os.getloadavg()[0]
            wall, rss, out, err = _popen_wait4([PY, "-c", CHILD, json.dumps(kw)])
            res = json.loads(out.strip().splitlines()[-1])
            row = {"method": method, "batch": "whole" if whole else "micro", "peak_rss_gb": round(rss, 2),
                   "load_1min": round(load, 1), **res, "eval_examples": args.eval_examples}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def threads(args: argparse.Namespace) -> list[dict]:
    cpus = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for neighbour in (False, True):
            spinner = subprocess.Popen([PY, "-c", "while True: pass"]) if neighbour else None
            try:
                time.sleep(1.0 if neighbour else 0.0)
                for mode in ("auto", "all-cpus"):
                    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS",)}
                    env.pop("WEIGHTSMITH_THREADS", None)
                    if mode == "all-cpus":
                        env["WEIGHTSMITH_THREADS"] = str(cpus)
                    for r in range(args.repeats):
                        cmd = [str(Path(PY).with_name("weightsmith")), "analyze", "minilm", "--out",
                               f"{tmp}/{mode}{int(neighbour)}{r}", "--force"]  # fmt: skip
                        load = os.getloadavg()[0]
                        wall, _, _, _ = _popen_wait4(cmd, env)
                        row = {"neighbour": neighbour, "threads": mode, "wall_s": round(wall, 2),
                               "load_1min": round(load, 1), "cpus": cpus}  # fmt: skip
                        print(json.dumps(row), flush=True)
                        rows.append(row)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    m = sub.add_parser("memory")
    m.add_argument("--methods", default="lora,dora")
    m.add_argument("--device", default="cpu")
    m.add_argument("--eval-examples", type=int, default=None, help="default: the whole validation text")
    m.add_argument("--whole", action="store_true", help="also run with the whole batch in one pass")
    t = sub.add_parser("threads")
    t.add_argument("--repeats", type=int, default=1)
    for p in (m, t):
        p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = memory(args) if args.what == "memory" else threads(args)
    if args.out is not None:
        from weightsmith.staging import write_text

        write_text(args.out, json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
