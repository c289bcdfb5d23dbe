"""What a user asks for: the YAML schema, trajectory discovery, multi-stage documents and the
run options (whose click flags are generated from one model).

    schema.py      the relex YAML document (mergekit's layout plus relex's keys), one-line errors
    trajectory.py  a run directory's checkpoint folders -> an explicit window
    stages.py      several YAML documents as stages that name each other
    options.py     every run-time option (Options) and the click flags generated from it
"""

__all__: list[str] = []
