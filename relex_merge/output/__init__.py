"""What a merge leaves behind besides tensor bytes: atomic output folders, the files a Hugging
Face model needs beside its weights, the model card, the provenance of multi-stage outputs, the
analysis plots, and the helper that drives an output sink through its lifecycle.

    folders.py     check, create atomically (one process or every rank), config.json, tokenizer
    card.py        the model card (README.md) of every output
    provenance.py  what the final output of a multi-stage merge records about its stages
    plots.py       analyze's PNG plots (matplotlib, optional)
    sinks.py       writes models through an OutputSink (relex_merge.io.writers) on one or many ranks
"""

__all__: list[str] = []
