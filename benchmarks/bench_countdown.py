"""How long the built-in countdown generator takes: problems drawn, targets enumerated, solutions found.

Run:  python benchmarks/bench_countdown.py            # 10,000 problems (3-4 numbers), seed 0
      python benchmarks/bench_countdown.py 50000 1    # n, seed
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uft as task  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0

start = time.perf_counter()
rows = task.generate_countdown(n, seed=seed)
elapsed = time.perf_counter() - start
print(f"generated {len(rows):,} countdown problems with worked solutions in {elapsed:.2f} s "
      f"({len(rows) / elapsed:,.0f} problems/s)")

start = time.perf_counter()
train, test = task.countdown_split(10_240, 1_024, seed=seed)
print(f"countdown_split(10,240, 1,024) in {time.perf_counter() - start:.2f} s")

start = time.perf_counter()
scores = [task.countdown_reward(r["question"] + r["answer"], r["nums"], r["target"]) for r in rows]
elapsed = time.perf_counter() - start
print(f"scored {len(rows):,} reference answers in {elapsed:.2f} s; all 1.0: {all(s == 1.0 for s in scores)}")
