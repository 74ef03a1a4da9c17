"""napari plugin: open studios images, and the annotate -> train -> preview -> segment loop.

Installed with the ``napari`` extra (``pip install -e ".[napari]"``); napari finds it through
the ``napari.manifest`` entry point (``napari.yaml`` here):

- reader (:mod:`pipeline.napari.reader`): a scan opens lazily as a multiscale Image layer, a
  segmentation or an annotations image as Labels with the class names and colours;
- dock widget (:mod:`pipeline.napari.widget`): classes, train, live preview, next suggested
  slice, segment the volume, QC report;
- ``studios annotate SCAN.zarr [MODEL]`` (:mod:`pipeline.cli.annotate`) starts napari with all of
  it (:func:`pipeline.napari.session.open_session`).

Only :mod:`pipeline.napari.store`, :mod:`~pipeline.napari.reader` and
:mod:`~pipeline.napari.preview` work without Qt.
"""
