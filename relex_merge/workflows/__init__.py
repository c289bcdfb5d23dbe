"""What the commands do, as library calls (the CLI only parses flags and renders results).

plan.py       config -> a checked MergePlan (headers only; nothing is read before it passes)
merge.py      run_merge (relex, mergekit or multi-stage) and execute_merge (one relex plan)
analyze.py    analyze: read the window once, write analysis.json, the fit cache and plots
fit_cache.py  every tensor's Gram matrix on disk, so a later merge skips the Gram pass
sweep.py      build candidates from one read, score each with lm-eval, keep the best
convert.py    any readable checkpoint -> a Hugging Face safetensors folder
"""

__all__: list[str] = []
