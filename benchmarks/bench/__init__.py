"""The quality benchmark behind `benchmarks/compare.py`, split by what it does.

- `protocol`: tasks, methods, budgets, learning-rate grids and settings, as
  data (no Keras);
- `data`: the SpamAssassin splits (fit, validation, test), tokenized once;
- `workers`: one training run in a subprocess of its own;
- `runner`: which runs to make (selection on validation, then seeds on
  test), the subprocesses, the results file;
- `stats`: paired differences and their intervals (pure NumPy);
- `report`: `RESULTS.md` from the results, its prose in `report.md`.
"""
