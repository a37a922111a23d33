"""pgbuild's evaluation runtime: the model, weight decoding and evaluation.

This package ships inside every artifact, so it imports only the standard library, torch, numpy,
sentencepiece and brotli, and never the builder.
"""
