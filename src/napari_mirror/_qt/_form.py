"""The run's input form, built with magicgui (one labelled row per input)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["NO_SLIDE", "InputForm"]

#: The slide choice of an expression-only run.
NO_SLIDE = "(no slide: expression only)"

_TABLES = "*.csv *.tsv *.txt *.parquet *.gz"


def _file_edit(label: str, filter: str, placeholder: str, tooltip: str) -> Any:
    from magicgui.widgets import FileEdit

    w = FileEdit(label=label, mode="r", filter=filter, nullable=True, tooltip=tooltip)
    w.choose_btn.text = "…"
    w.choose_btn.tooltip = f"Choose the {label.lower()} file"
    w.choose_btn.native.setMaximumWidth(32)
    w.line_edit.native.setPlaceholderText(placeholder)
    w.line_edit.native.setMinimumWidth(60)
    return w


def _narrow_combo(combo: Any) -> None:
    # A combo box sized to its longest item (a slide name) would widen the whole panel.
    from qtpy.QtWidgets import QComboBox

    combo.native.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
    combo.native.setMinimumContentsLength(8)


class InputForm:
    """magicgui widgets for the inputs of one run; ``native`` is the Qt widget to embed.

    Attributes
    ----------
    slide, sample, nan_policy, device : magicgui.widgets.ComboBox
    mpp : magicgui.widgets.FloatSpinBox
        Level-0 µm per pixel for opening files without resolution metadata (0 = from the file).
    open_slide : magicgui.widgets.PushButton
    features, bundle, expression : magicgui.widgets.FileEdit
    """

    def __init__(self) -> None:
        from magicgui.widgets import ComboBox, Container, FloatSpinBox, PushButton

        self.slide = ComboBox(
            label="Slide",
            choices=[NO_SLIDE],
            tooltip="The slide layer to analyse (opened with the MIRROR reader).",
        )
        self.mpp = FloatSpinBox(
            label="µm/px",
            min=0.0,
            max=100.0,
            step=0.05,
            value=0.0,
            tooltip=(
                "Level-0 resolution used by 'Open slide…'. Keep 'from the file' unless the file "
                "has no resolution metadata (0.25 for a 40x scan, 0.5 for 20x)."
            ),
        )
        spin = self.mpp.native
        spin.setDecimals(4)
        spin.setSuffix(" µm/px")
        spin.setSpecialValueText("from the file")
        self.open_slide = PushButton(text="Open slide…", tooltip="Open a slide file as a layer.")
        mpp_row = Container(widgets=[self.mpp, self.open_slide], layout="horizontal", labels=False)
        mpp_row.margins = (0, 0, 0, 0)
        mpp_row.label = "Resolution"
        self.features = _file_edit(
            "Features",
            "*.h5 *.hdf5",
            "optional: precomputed (.h5)",
            "Patch features from `mirror-train extract` (or CLAM/TRIDENT) used instead of "
            "re-encoding the slide.",
        )
        self.bundle = _file_edit(
            "Model",
            "*.mirror",
            "embedded demo bundle",
            "A .mirror model bundle; empty = the embedded demo bundle (synthetic data).",
        )
        self.expression = _file_edit(
            "Expression",
            _TABLES,
            "optional: table (.csv/.tsv/.parquet)",
            "The patient's gene expression table (samples x genes or genes x samples).",
        )
        self.sample = ComboBox(
            label="Patient row", choices=[], tooltip="The patient's row of the expression table."
        )
        self.nan_policy = ComboBox(
            label="Missing values",
            choices=[
                ("stop with an error", "error"),
                ("training medians", "median"),
                ("drop those genes", "drop-genes"),
                ("set to zero", "zero"),
            ],
            value="error",
            tooltip=(
                "What to do with missing values in the expression table: stop and list them, "
                "fill each gene with its median over the model's training patients, leave those "
                "genes out, or set them to 0."
            ),
        )
        self.device = ComboBox(label="Device", choices=["auto", "cpu", "cuda"], value="auto")
        self.container = Container(labels=True)
        # Added after construction: magicgui aligns the label column only for widgets
        # inserted into an initialised container.
        self.container.extend(
            [self.slide, mpp_row, self.bundle, self.expression, self.sample, self.nan_policy,
             self.features, self.device]
        )
        self.container.margins = (0, 0, 0, 0)
        for combo in (self.slide, self.sample, self.nan_policy, self.device):
            _narrow_combo(combo)

    @property
    def native(self) -> Any:
        return self.container.native

    # ------------------------------------------------------------------------- values
    @staticmethod
    def path_text(edit: Any) -> str:
        """The text of a file field ('' when empty)."""
        return str(edit.line_edit.value).strip()

    @staticmethod
    def set_path(edit: Any, path: str | Path | None) -> None:
        edit.line_edit.value = "" if path is None else str(path)

    def set_choices(self, combo: Any, items: list[str], keep: str | None = None) -> None:
        """Replace a combo box's items, keeping ``keep`` selected when it is still there."""
        with combo.changed.blocked():
            combo.choices = items
            if keep is not None and keep in items:
                combo.value = keep
            elif items:
                combo.value = items[0]
