"""Accuracy table of the toy model under every scorer at three budgets (issue 13).

    python -m benchmarks.accuracy              # ~10 min on one CPU thread; writes
                                               # benchmarks/results/accuracy.json and ACCURACY.md
    python -m benchmarks.accuracy --from-json  # regenerate ACCURACY.md from the JSON only
    python -m benchmarks.accuracy --quick      # smoke run (accuracy-quick.json / ACCURACY-quick.md)

The measurement lives in :mod:`tokencomp.toy.accuracy` (also behind ``tokencomp analyze --accuracy``).
"""

from tokencomp.toy.accuracy import main

if __name__ == "__main__":
    raise SystemExit(main())
