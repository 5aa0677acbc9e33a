"""Result sections of the MIRROR panel: the model card (with its warning banner), the
prediction, the reference cohort's Kaplan–Meier plot and the validation figures.

They only display a :class:`napari_mirror._panel.ResultSummary` prepared off the GUI thread,
so filling them is cheap.
"""

from __future__ import annotations

import html

from qtpy.QtCore import Qt
from qtpy.QtGui import QImage, QPixmap
from qtpy.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from .._panel import GROUP_COLOURS, ResultSummary

__all__ = ["KMView", "MetricsView", "ModelCardView", "PredictionView", "rich_label"]

BANNER_STYLE = (
    "QLabel { background: #7a1f1f; color: white; border-radius: 4px; padding: 6px; "
    "font-weight: bold; }"
)
NOTE_COLOUR = "#e0a030"


def rich_label(text: str = "", selectable: bool = True) -> QLabel:
    """A word-wrapped rich-text label that never asks for more width than it is given."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setTextFormat(Qt.TextFormat.RichText)
    lab.setMinimumWidth(10)
    if selectable:
        lab.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    return lab


class ModelCardView(QWidget):
    """Model name, training data, date and intended use, under a banner for demo models."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.banner = QLabel()
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet(BANNER_STYLE)
        self.banner.setMinimumWidth(10)
        self.banner.hide()
        self.text = rich_label("The model is described here after a run.")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.banner)
        lay.addWidget(self.text)

    def show_card(self, summary: ResultSummary) -> None:
        card = summary.card
        if card.warning:
            self.banner.setText("⚠ " + card.warning)
            self.banner.show()
        else:
            self.banner.hide()
        rows = [
            ("Model", card.name),
            ("Trained on", card.training_data),
            ("Created", card.created),
            ("Intended use", card.intended_use),
        ]
        self.text.setText(
            "<table cellspacing='2'>"
            + "".join(
                f"<tr><td><b>{html.escape(k)}</b></td><td>{html.escape(v)}</td></tr>" for k, v in rows
            )
            + "</table>"
        )

    def clear(self) -> None:
        self.banner.hide()
        self.text.setText("The model is described here after a run.")


class PredictionView(QWidget):
    """Inputs used, subtype probabilities, risk and the prediction's warnings."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = rich_label("No result yet: pick inputs and press Run.")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.text)

    def show_summary(self, s: ResultSummary) -> None:
        parts = [f"<b>Inputs:</b> {html.escape(s.inputs)}"]
        if s.sample:
            parts.append(f"<b>Expression row:</b> {html.escape(s.sample)}")
        if s.warnings:
            parts.append(
                f"<span style='color:{NOTE_COLOUR}'>"
                + "<br>".join("⚠ " + html.escape(w) for w in s.warnings)
                + "</span>"
            )
        if s.subtype_rows:
            rows = []
            for name, text, p, best in s.subtype_rows:
                bar = "█" * max(0, round(12 * p))
                tag = "b" if best else "span"
                rows.append(
                    f"<tr><td><{tag}>{html.escape(name)}</{tag}></td>"
                    f"<td align='right'><{tag}>{html.escape(text).replace(' ', '&nbsp;')}</{tag}></td>"
                    f"<td><span style='color:#4a90d9'>{bar}</span></td></tr>"
                )
            parts.append(
                f"<b>Predicted subtype: {html.escape(s.predicted_subtype or '')}</b>"
                f"<table cellspacing='3'>{''.join(rows)}</table>"
            )
        else:
            parts.append("<b>Subtype:</b> the bundle has no subtype head for these inputs.")
        if s.risk_lines:
            colour = GROUP_COLOURS.get((s.risk_group or "").lower(), "#888")
            first, *rest = s.risk_lines
            parts.append(
                f"<b style='color:{colour}'>{html.escape(first)}</b><br>"
                + "<br>".join(html.escape(x) for x in rest)
            )
        else:
            parts.append("<b>Risk:</b> the bundle has no survival head for these inputs.")
        self.text.setText("<br>".join(parts))

    def clear(self) -> None:
        self.text.setText("No result yet: pick inputs and press Run.")


class KMView(QWidget):
    """The reference cohort's Kaplan–Meier plot (an image rendered off the GUI thread)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image = QLabel()
        self.image.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.image.setMinimumWidth(10)
        self.notes = rich_label("")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.image)
        lay.addWidget(self.notes)
        self._qimage: QImage | None = None

    def show_summary(self, s: ResultSummary) -> None:
        km = s.km
        if km is None:
            self.image.clear()
            self._qimage = None
            self.notes.setText("No reference cohort for these inputs in this bundle.")
            return
        h, w = km.rgba.shape[:2]
        self._qimage = QImage(km.rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888).copy()
        pix = QPixmap.fromImage(self._qimage)
        pix.setDevicePixelRatio(km.scale)
        self.image.setPixmap(pix)
        self.notes.setText(
            "<span style='color:{}'>{}</span>".format(NOTE_COLOUR, "<br>".join(html.escape(n) for n in km.notes))
        )

    def clear(self) -> None:
        self.image.clear()
        self.notes.setText("")


class MetricsView(QWidget):
    """A few headline validation figures; the full table behind a button."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.text = rich_label("")
        self.table_button = QPushButton("Full table…")
        self.table_button.setToolTip("Every validation metric stored in the bundle.")
        self.table_button.clicked.connect(self.show_table)
        self.table_button.setEnabled(False)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.table_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.text)
        lay.addLayout(row)
        self._rows: tuple[tuple[str, str], ...] = ()
        self._title = ""
        self.dialog: QDialog | None = None

    def show_summary(self, s: ResultSummary) -> None:
        self._rows = s.metric_rows
        self._title = s.card.name
        if s.headlines:
            body = "".join(
                f"<tr><td title='{html.escape(h.detail)}'>{html.escape(h.label)}</td>"
                f"<td align='right'><b>{html.escape(h.value)}</b></td></tr>"
                for h in s.headlines
            )
            self.text.setText(
                f"<table cellspacing='3'>{body}</table>"
                "<span style='color:gray'>held-out folds of the bundle's training cohort, "
                "mean ± sd</span>"
            )
        else:
            self.text.setText("This bundle stores no validation metrics.")
        self.table_button.setEnabled(bool(self._rows))
        self.table_button.setText(f"Full table ({len(self._rows)})…")

    def clear(self) -> None:
        self._rows = ()
        self.text.setText("")
        self.table_button.setEnabled(False)

    def show_table(self) -> QDialog:
        """Open (non-modal) the table of every stored metric."""
        dlg = QDialog(self)
        dlg.setWindowTitle(f"Validation metrics of {self._title}")
        table = QTableWidget(len(self._rows), 2, dlg)
        table.setHorizontalHeaderLabels(["metric", "value (mean ± sd over folds)"])
        for i, (k, v) in enumerate(self._rows):
            table.setItem(i, 0, QTableWidgetItem(k))
            item = QTableWidgetItem(v)
            item.setTextAlignment(int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter))
            table.setItem(i, 1, item)
        table.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        table.resizeColumnToContents(1)
        table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close, parent=dlg)
        buttons.rejected.connect(dlg.close)
        lay = QVBoxLayout(dlg)
        lay.addWidget(table)
        lay.addWidget(buttons)
        dlg.resize(560, 480)
        dlg.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dlg.show()
        self.dialog = dlg
        return dlg
