"""The course on a CUDA machine, in one run: the ``gpu`` preset zoo, the benches, the solution notebooks.

    python bench/gpu_check.py --out DIR [--budget SECONDS] [--jobs N]

1. runs the bench scripts with ``--quick`` on ``cuda``, one at a time and alone on the GPU, so
   their timings are not disturbed (``bench/gpu_kernels.py`` first: the decode-step kernels);
2. then, side by side: trains the three zoo models at the ``gpu`` preset (one process each) and
   records their training time and final quality; runs the GPU-marked tests; executes every
   solution notebook in a fresh kernel (``--jobs`` at a time, 2 CPU threads each) with the cached
   ``cpu`` preset zoo (on the GPU all the same), recording time and the first error of each.

Everything lands in DIR: ``summary.json``, ``log.txt`` (all output) and ``notebooks.zip`` (the
executed notebooks, added as each finishes). Each step has a share of ``--budget`` so that a slow step cannot starve the
rest. Needs CUDA; on a machine without it, it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZOO_NAMES = ("shakespeare-moe", "mnist1d-moe", "digits-moe")
BENCHES = (["bench/gpu_kernels.py", "--quick"],
           ["bench/sparsity.py", "--quick"],
           ["bench/kv_cache.py", "--quick", "--device", "cuda"],
           ["bench/hf_forward.py", "--quick", "--device", "cuda", "--dtype", "bfloat16", "--scale", "1",
            "--tokens", "1", "64", "4096"],
           ["bench/dispatch.py", "--quick", "--device", "cuda"],
           ["bench/factorized.py", "--quick", "--device", "cuda"])

TRAIN = """
import json, sys, time, torch
from moe_course import zoo
t = time.perf_counter()
model = zoo.pretrained(sys.argv[1], preset="gpu", progress=False)
info = dict(model.zoo_info)
info["wall_seconds"] = round(time.perf_counter() - t, 1)
info["device_name"] = torch.cuda.get_device_name(0)
print("ZOO_INFO " + json.dumps(info, default=str))
"""


def run(cmd: list[str], log, timeout: float, env: dict | None = None) -> tuple[int, float, str]:
    """Run ``cmd`` with a time limit; its output goes to the log and is returned."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"{err.stdout or ''}{err.stderr or ''}\n[timed out after {timeout:.0f} s]"
        out = out if isinstance(out, str) else out.decode(errors="replace")
    seconds = time.perf_counter() - start
    log.write(f"\n===== {' '.join(cmd)}  (exit {code}, {seconds:.1f} s)\n{out}\n")
    log.flush()
    return code, seconds, out


def execute_notebook(path: Path, out_dir: Path, timeout: float) -> dict:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=int(timeout), kernel_name="python3", resources={"metadata": {"path": str(REPO / "solutions")}})
    start = time.perf_counter()
    status, error = "ok", ""
    try:
        client.execute()
    except CellExecutionError as err:
        status, error = "cell error", str(err).strip().splitlines()[-1][:500] if str(err).strip() else "?"
    except (CellTimeoutError, TimeoutError):
        status, error = "timeout", f"a cell ran past {timeout:.0f} s"
    except DeadKernelError as err:
        status, error = "kernel died", str(err)[:300]
    seconds = time.perf_counter() - start
    nbformat.write(nb, out_dir / path.name)
    return {"notebook": path.name, "status": status, "seconds": round(seconds, 1), "error": error}


def save(summary: dict, out: Path) -> None:
    """Written after every step: a run cut short still leaves what it measured."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget", type=float, default=520.0, help="seconds for the whole run (default 520)")
    parser.add_argument("--jobs", type=int, default=6, help="notebooks executed at once (default 6)")
    parser.add_argument("--steps", default="bench,zoo,notebooks",
                        help="comma-separated subset of bench,zoo,notebooks (default all). With zoo and "
                             "notebooks but no bench, the notebooks wait for the gpu zoo and use it")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + args.budget
    summary: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "zoo": {}, "bench": [],
                     "notebooks": []}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "TQDM_DISABLE": "1", "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with open(args.out / "log.txt", "w") as log:
        # 1. benches, alone on the GPU -- at most 40 % of the budget
        steps = set(args.steps.split(","))
        bench_deadline = time.perf_counter() + 0.4 * args.budget
        for cmd in BENCHES if "bench" in steps else ():
            remaining = bench_deadline - time.perf_counter()
            if remaining < 5:
                summary["bench"].append({"cmd": " ".join(cmd), "exit": None, "output": ["budget spent"]})
                continue
            code, seconds, out = run([sys.executable, *cmd], log, min(75.0, remaining), env)
            summary["bench"].append({"cmd": " ".join(cmd), "exit": code, "seconds": round(seconds, 1),
                                     "output": out.strip().splitlines()[-40:]})
            save(summary, args.out)
        # 2. the gpu zoo, the GPU tests and the solution notebooks side by side
        share = deadline - time.perf_counter() - 10
        side = ThreadPoolExecutor(max_workers=len(ZOO_NAMES) + 1)
        zoo_share = share if "bench" in steps or "notebooks" not in steps else 0.6 * args.budget
        trains = {name: side.submit(run, [sys.executable, "-c", TRAIN, name], log, zoo_share, env)
                  for name in (ZOO_NAMES if "zoo" in steps else ())}
        tests = side.submit(run, [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                  "tests", "-o", "addopts="], log, share, env)
        preset = "cpu"
        if "bench" not in steps and "zoo" in steps:  # the notebooks wait for the gpu zoo
            for future in trains.values():
                future.result()
            if all(f.result()[0] == 0 for f in trains.values()):
                preset = "gpu"
            share = deadline - time.perf_counter() - 10
        nb_env = {"PYTHONPATH": env["PYTHONPATH"], "TQDM_DISABLE": "1", "MPLBACKEND": "Agg",
                  "MOE_COURSE_PRESET": preset, "OMP_NUM_THREADS": "2"}
        summary["notebook_preset"] = preset
        executed = Path(tempfile.mkdtemp(prefix="gpu-check-"))  # outside --out: only the zip goes back
        notebooks = sorted((REPO / "solutions").glob("*.ipynb")) if "notebooks" in steps else []
        timeout = max(30.0, share - 5)
        os.environ.update(nb_env)  # every kernel inherits this process's environment
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        futures = [pool.submit(execute_notebook, p, executed, timeout) for p in notebooks]
        try:
            for future in as_completed(futures, timeout=max(1.0, deadline - time.perf_counter())):
                result = future.result()
                summary["notebooks"].append(result)
                log.write(f"notebook {result}\n")
                log.flush()
                with zipfile.ZipFile(args.out / "notebooks.zip", "a", zipfile.ZIP_DEFLATED) as archive:
                    archive.write(executed / result["notebook"], result["notebook"])
                save(summary, args.out)
        except TimeoutError:
            done = {r["notebook"] for r in summary["notebooks"]}
            summary["notebooks"] += [{"notebook": p.name, "status": "budget spent"} for p in notebooks
                                     if p.name not in done]
        pool.shutdown(wait=False, cancel_futures=True)
        for name, future in trains.items():
            try:
                future.result(timeout=max(0.0, deadline - time.perf_counter()))
            except TimeoutError:
                pass
            if future.done():
                code, seconds, out = future.result()
                line = next((ln for ln in out.splitlines() if ln.startswith("ZOO_INFO ")), None)
                summary["zoo"][name] = json.loads(line[9:]) if line else {"exit": code, "seconds": round(seconds, 1),
                                                                          "tail": out.strip().splitlines()[-3:]}
            else:
                summary["zoo"][name] = {"status": "still training at the deadline"}
        if tests.done():
            code, seconds, out = tests.result()
            summary["gpu_tests"] = {"exit": code, "tail": out.strip().splitlines()[-3:] if out.strip() else []}
    save(summary, args.out)
    print(json.dumps({k: v for k, v in summary.items() if k != "bench"}, indent=1, default=str))
    for bench in summary["bench"]:
        print(f"--- {bench['cmd']} (exit {bench['exit']}, {bench['seconds']} s)")
        print("\n".join(bench["output"]))
    sys.stdout.flush()
    os._exit(0)  # do not wait for kernels of notebooks cut off by the budget


if __name__ == "__main__":
    sys.exit(main())
