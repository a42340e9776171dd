"""`lmforge quickstart` of two source trees, alternated: its final validation loss and wall time.

    git worktree add /tmp/before <commit>
    python benchmarks/quickstart_ab.py --before /tmp/before/src --after src [--rounds 2]

Each run is the whole command as a user types it, in a fresh process with a fresh run directory
(so the corpus is prepared and the tokenizer trained every time) and an empty torch.compile cache
(TORCHINDUCTOR_CACHE_DIR), so compiling is counted as a first run pays it. Prints one JSON line
per run, then per tree the median wall time and loss with their min - max.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def run_quickstart(src: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="lmforge-qs-") as tmp:
        env = {**os.environ, "PYTHONPATH": src, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        started = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "lmforge", "quickstart", "--out", f"{tmp}/run"],
                             env=env, capture_output=True, text=True, check=True)  # fmt: skip
        wall_s = time.perf_counter() - started
    loss = float(re.search(r"^validation loss\s+([\d.]+)", out.stdout, re.M).group(1))
    bits = re.search(r"nats/token = ([\d.]+) bits/byte", out.stdout)
    return {"wall_s": wall_s, "val_loss": loss, "bits_per_byte": float(bits.group(1)) if bits else None,
            "stdout_tail": out.stdout[-1200:]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="src directory of the old tree")
    parser.add_argument("--after", required=True, help="src directory of the new tree")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for round_ in range(args.rounds):
        for name in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
            result = run_quickstart(getattr(args, name))
            results[name].append(result)
            print(json.dumps({"round": round_, "tree": name, **result}), flush=True)
    print("\n| tree | wall s, median | min - max | val loss, median | min - max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, runs in results.items():
        walls, losses = [r["wall_s"] for r in runs], [r["val_loss"] for r in runs]
        print(f"| {name} | {statistics.median(walls):.1f} | {min(walls):.1f} - {max(walls):.1f} | "
              f"{statistics.median(losses):.3f} | {min(losses):.3f} - {max(losses):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
