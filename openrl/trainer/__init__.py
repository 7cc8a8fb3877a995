"""Trainer: LoRA training of many tenants on one base model."""
