"""lora-service: one frozen base model, many LoRA adapters, served over HTTP.

    service/settings.py   Settings: flags and LORA_* variables         service/app.py     create_app(settings)
    service/storage/      adapter index + blob store (the seam)         service/routes/    thin routers
    service/engine/       batching loop, merge policy, cache tiers     service/cli.py     lora-serve

Importing this package is cheap; torch loads with the app.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
