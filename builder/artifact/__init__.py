"""The artifact: packing streams into one file, fitting the byte budget, the entropy coder, and
the static audit of where the bytes go."""
