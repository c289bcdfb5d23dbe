"""The bottom layer: what every other layer may use and which uses nothing of relex-merge.

errors.py     RelexError and the one line (and exit code) every failure is reported with
units.py      sizes as people write them (8GB, 512MiB) and read them
progress.py   the Progress protocol long calls report through (the CLI draws it with rich)
registry.py   plug-in folders: one file per fit family, format, executor, sink or command
"""

__all__: list[str] = []
