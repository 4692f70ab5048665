"""ray_fedit: federated instruction tuning of LLMs with LoRA on Ray, with safety attacks and defenses."""

__version__ = "0.1.0"
