"""Data tooling: downloading NIH, preparing the uint8 cache, the demo generator, photo corruptions,
the Colab cache on Drive and checkpoint conversion. Built on the core (chexnet/*.py); the core
never imports this package."""
