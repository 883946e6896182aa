"""glmtune: P-Tuning v2 and LoRA fine-tuning for ChatGLM-family and other decoder language models."""

__version__ = "0.1.0"
