"""conditune: condition-number guided fine-tuning of pretrained LLMs for new modalities."""

__version__ = "0.1.0"
