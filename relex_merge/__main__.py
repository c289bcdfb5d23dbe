"""``python -m relex_merge ...`` is the ``relex-merge`` command (also under torchrun and srun)."""

from relex_merge.cli import main

if __name__ == "__main__":
    main(prog_name="relex-merge")
