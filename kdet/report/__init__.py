"""``kdet report``: teacher, baseline and distilled students compared in one self-contained
HTML page and its Markdown twin (tables, training curves, accuracy against latency, per-class
AP, precision-recall curves, sample detections).

:mod:`.collect` decides which models the report shows and gathers what it measures of them
(test-split predictions and CPU latency, both cached in the run directories), :mod:`.plots`
draws the figures, :mod:`.page` writes the HTML and Markdown, :mod:`.build` puts them together.
"""
