"""`python -m service` is `lora-serve`."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
