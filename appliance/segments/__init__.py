"""Segments: the S3 history tier (format, store, index, flush, compaction).

Segments never import messages: a record payload is opaque bytes here.
"""
