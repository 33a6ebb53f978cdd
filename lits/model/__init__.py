"""torch, no Ray: the U-Net, the Predictor and a volume's chunks streamed through a model."""
