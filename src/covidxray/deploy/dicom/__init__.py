"""The DICOM node for a hospital PACS, and the DICOM objects of its results."""
