"""Training: the classifier search and retrain, the U-Net, cross-validation, shared callbacks."""
