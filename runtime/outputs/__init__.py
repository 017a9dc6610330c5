"""Synthetic images out: file formats (formats: PNG, .npy, DICOM, grid PNG), sample sets
written resumably (sample_set), their shards, records and merged manifest (shards).
"""
