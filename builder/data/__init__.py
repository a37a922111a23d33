"""Datasets: building shards and a tokenizer from text, downloading the challenge's, and reading
training batches."""
