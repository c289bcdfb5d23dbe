"""mergekit interoperability: RELEX as a mergekit merge method (the same math and kernels as the
engine), and mergekit's own runner for every other method, with relex registered.

    mergekit_method.py   merge_method: relex for mergekit (register() is explicit)
    mergekit_runner.py   run any mergekit config, atomically, with our model card
"""

__all__: list[str] = []
