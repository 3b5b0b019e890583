"""Entry point of the ``mambaxray-ctl`` console script."""

from mambaxray_ctl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
