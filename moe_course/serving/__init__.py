"""Decode-time reality (chapter 13): expert parallelism across processes (``parallel``)."""
