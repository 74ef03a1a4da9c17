"""The class table of the widget: one row per label (name editable, colour from a picker)."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtCore import Signal
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QColorDialog,
    QHBoxLayout,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from pipeline.napari.store import default_colors


class ClassTable(QWidget):
    """Label k (row k - 1): name and colour. Signals ``changed(names, colors)``, ``selected(label)``."""

    changed = Signal(tuple, tuple)
    selected = Signal(int)

    def __init__(self, names: Sequence[str] = (), colors: Sequence[str] = ()) -> None:
        super().__init__()
        self.table = QTableWidget(0, 2)
        self.table.setHorizontalHeaderLabels(["class", "colour"])
        self.table.horizontalHeader().setStretchLastSection(True)  # type: ignore[union-attr]
        self.table.setSelectionBehavior(QTableWidget.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QTableWidget.SelectionMode.SingleSelection)
        self.table.setMaximumHeight(140)
        self.add_button = QPushButton("+ class")
        self.add_button.clicked.connect(self._add)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.table)
        row = QHBoxLayout()
        row.addWidget(self.add_button)
        row.addStretch(1)
        layout.addLayout(row)
        self._colors: list[str] = []
        self._quiet = False
        self.table.itemChanged.connect(self._edited)
        self.table.cellDoubleClicked.connect(self._cell_clicked)
        self.table.itemSelectionChanged.connect(self._select)
        self.set_classes(names, colors)

    def set_classes(self, names: Sequence[str], colors: Sequence[str]) -> None:
        """Show ``names``/``colors`` (labels 1..K) without emitting ``changed``."""
        self._quiet = True
        try:
            self._colors = list(colors)
            self.table.setRowCount(len(names))
            for k, name in enumerate(names):
                self.table.setItem(k, 0, QTableWidgetItem(str(name)))
                swatch = QTableWidgetItem(self._colors[k])
                swatch.setBackground(QColor(self._colors[k]))
                self.table.setItem(k, 1, swatch)
        finally:
            self._quiet = False

    def names(self) -> tuple[str, ...]:
        items = (self.table.item(k, 0) for k in range(self.table.rowCount()))
        return tuple(item.text() if item is not None else "" for item in items)

    def colors(self) -> tuple[str, ...]:
        return tuple(self._colors)

    def set_color(self, row: int, color: str) -> None:
        """Give label ``row + 1`` the colour ``#rrggbb`` and emit ``changed``."""
        self._colors[row] = QColor(color).name()
        self.set_classes(self.names(), self._colors)
        self.changed.emit(self.names(), self.colors())

    def _add(self) -> None:
        k = self.table.rowCount()
        self.set_classes([*self.names(), f"class{k + 1}"], [*self._colors, default_colors(k + 1)[k]])
        self.changed.emit(self.names(), self.colors())
        self.table.selectRow(k)

    def _edited(self, item: QTableWidgetItem) -> None:
        if not self._quiet and item.column() == 0:
            self.changed.emit(self.names(), self.colors())

    def _cell_clicked(self, row: int, column: int) -> None:
        if column != 1:
            return
        chosen = QColorDialog.getColor(QColor(self._colors[row]), self, "Class colour")
        if chosen.isValid():
            self.set_color(row, chosen.name())

    def _select(self) -> None:
        model = self.table.selectionModel()
        rows = model.selectedRows() if model is not None else []
        if rows:
            self.selected.emit(rows[0].row() + 1)
