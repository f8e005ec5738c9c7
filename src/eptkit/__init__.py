"""eptkit: Efficient Prompt Tuning (EPT), DePT and prompt tuning for Hugging Face transformers."""

__version__ = "0.1.0"
