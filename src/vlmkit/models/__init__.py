"""Model parts and the VisionLanguageModel that wires them."""
