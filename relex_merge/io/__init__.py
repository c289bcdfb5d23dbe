"""Reading checkpoints and writing models.

``registry.open_checkpoint`` opens any supported checkpoint; one module per format
(``safetensors``, ``torch_bin``, ``fsdp``, ``dcp``, ``zero``) defines its reader and its
``FORMAT``, and the registry finds them. ``base`` holds the reader interface and what the
formats share, ``dtypes`` the one dtype table, ``hf`` Hugging Face folder helpers and
``writer`` the streaming safetensors writer.

This package imports nothing itself, so ``relex_merge.io.dtypes`` or ``writer`` load without
every format.
"""

__all__: list[str] = []  # every name lives in a submodule; import it from there
