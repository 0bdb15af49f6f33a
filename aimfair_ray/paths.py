"""Where a run's artefacts live (``cfg.paths``): the names the stages hand each other, so no
stage spells another stage's folder layout, and nothing guesses an artefact from a folder name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunPaths:
    root: str  # <output_dir>/<name>

    def stage(self, name: str) -> str:
        return f"{self.root}/{name}"

    @property
    def data(self) -> str:
        return f"{self.root}/data"

    def split(self, name: str) -> str:
        return f"{self.data}/{name}"

    @property
    def synthetic(self) -> str:
        return f"{self.root}/synthetic"

    def synthetic_set(self, balance: str, filtered: bool = False) -> str:
        """``balanced`` or ``imbalanced``, the faithfulness-filtered copy with ``filtered``."""
        return f"{self.synthetic}/{balance}{'_filtered' if filtered else ''}"

    @property
    def checker(self) -> str:
        return f"{self.root}/checker"

    @property
    def baseline_model(self) -> str:
        return self.model("baseline")

    def model(self, stage: str) -> str:
        """The exported model of a training stage (``baseline``, ``finetune/selective``, ...)."""
        return f"{self.root}/{stage}/model"

    def scores(self, stage: str = "finetune/scores") -> str:
        return f"{self.root}/{stage}"
