"""Data: discover labelled records (class folders, split folders, CSV), split them by patient,
audit them (duplicates, leaks, confounding by source), and draw synthetic demo images."""
