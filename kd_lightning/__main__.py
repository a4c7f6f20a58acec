"""``python -m kd_lightning`` is the ``kd-lightning`` console script."""

from kd_lightning.cli import main

if __name__ == "__main__":
    main()
