"""Binarization primitives and the baseline methods: full precision, XNOR-Net, Bi-Real Net, ReActNet."""
