"""What the final output of a multi-stage merge records about every stage, so that it still says
how it was made after the intermediate folders are gone."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Provenance"]


@dataclass(frozen=True)
class Provenance:
    """What the final output of a multi-stage merge records about every stage, so that it still
    says how it was made after the intermediate folders are gone."""

    source: str  # the config file
    documents_yaml: str  # the config as given: later stages name earlier ones
    stage_lines: tuple[str, ...]  # one line per stage that ran before the final one
    paths: dict[str, str]  # stage name -> the folder it was written to (for restore_names)
    file_name: str = "relex_stages.yml"  # the copy of the whole config beside the final output

    @property
    def config_header(self) -> str:
        """Comment lines that head the final output's config, pointing to the stages."""
        return (
            f"# stage {len(self.stage_lines) + 1} of a multi-stage merge ({self.source}); models named after a "
            f"stage are that stage's output: see {self.file_name} and README.md\n"
        )

    @property
    def card_section(self) -> str:
        """The model card's "Stages" section: one line per earlier stage."""
        lines = [
            "",
            "## Stages",
            "",
            f"This model is the final stage of the multi-stage config `{self.source}`, copied here as "
            f"`{self.file_name}`. Earlier stages (their outputs were intermediate folders):",
            "",
        ]
        return "\n".join(lines + [f"- {line}" for line in self.stage_lines]) + "\n"

    def restore_names(self, text: str) -> str:
        """A config text with the stages' folders replaced by the stages' names."""
        for name, path in sorted(self.paths.items(), key=lambda item: -len(item[1])):
            text = text.replace(path, name)
        return text
