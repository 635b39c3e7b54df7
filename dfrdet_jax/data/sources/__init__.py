"""Readers of the data sets' files: COCO json (coco.py), DOTA label text and tiling (dota.py),
and the synthetic generator (synthetic.py); data/catalog.py says which data set uses which."""
