"""bt_pipeline: find (slice classifier) and outline (U-Net) brain tumours in LGG FLAIR MRI."""

__version__ = "0.1.0"
