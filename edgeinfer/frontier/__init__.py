"""`edgeinfer frontier`: measure a model's variants (weight types, pruning, KV-cache types, threads) for quality,
speed, memory and energy, mark the Pareto frontier and choose one for given constraints.

Modules, in the order a run uses them: variants (the grid; weight variants made once with the converter and cached
under $EDGEINFER_HOME/frontier), energy (RAPL, battery or an estimate), measure (one child process per weight and
KV type: size, peak RSS, prefill/decode speed, time to first token, energy, perplexity and KL), pareto (the
frontier), choose (constraints -> a variant; a stored frontier -> this machine's variant), report (table, JSON,
CSV, plot), run (the whole run with progress and Ctrl-C). The command is edgeinfer/cli_frontier.py.
"""
