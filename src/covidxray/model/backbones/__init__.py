"""Backbones that keras.applications does not carry (EfficientNet-Lite, with offline weights)."""
