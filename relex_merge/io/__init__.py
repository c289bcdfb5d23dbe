"""Reading checkpoints and writing models.

    formats/        one file per checkpoint format (reader + FORMAT); ``formats.open_checkpoint``
                    opens any supported checkpoint
    writers/        one file per output format (an OutputSink + WRITER): safetensors
    base.py         the reader interface and what the formats share
    dtypes.py       the one dtype table
    hf.py           Hugging Face folder helpers
    fingerprints.py fingerprints of weight files (model cards, fit caches)

This package imports nothing itself, so ``relex_merge.io.dtypes`` loads without every format.
"""

__all__: list[str] = []  # every name lives in a submodule; import it from there
