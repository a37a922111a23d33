"""pgbuild's builder: data preparation, training, quantization, packing and auditing."""
