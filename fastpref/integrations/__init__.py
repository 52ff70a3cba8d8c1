"""Integrations: Hugging Face transformers model patching, TRL trainers."""
