"""Entry point of `python -m difa.calibrate`; see difa/cli/calibrate.py."""

from difa.cli.calibrate import main

if __name__ == "__main__":
    main()
