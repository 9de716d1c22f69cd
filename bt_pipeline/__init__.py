"""bt_pipeline: find (slice classifier) and outline (U-Net) brain tumours in LGG FLAIR MRI.

``from bt_pipeline import segment`` segments one case in memory
(:func:`bt_pipeline.inference.segment.segment`); TensorFlow loads on first use, not on import.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name in ("segment", "Segmentation"):
        from bt_pipeline.inference import segment as module

        return getattr(module, name)
    raise AttributeError(f"module 'bt_pipeline' has no attribute {name!r}")
