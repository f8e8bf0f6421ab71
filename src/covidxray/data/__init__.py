"""Data: discover labelled records (class folders, split folders, CSV: ``dataset``), split them
by patient (``split``), audit them (duplicates, leaks, conflicts, confounding: ``audit``), measure
how well image statistics alone give their classes away (``statistics``), choose the sources
training keeps (``sources``), read lung image/mask pairs (``masks``), draw synthetic demo images
(``synthetic``) and download Kaggle sets (``download``)."""
