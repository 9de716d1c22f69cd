"""Data: the slice manifest and patient split, slice preprocessing, and the tf.data loader."""
